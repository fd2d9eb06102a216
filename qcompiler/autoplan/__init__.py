"""Automatic mixed precision: the most accurate plan that fits a byte, weight-bit or BitOps budget.

``qcompiler plan MODEL --budget SIZE --calib DATA -o plan.yaml`` (and ``qcompiler compile --budget``):

1. **Layers.** The model is prepared as ``compile`` prepares it (the target's pipeline up to and including
   ``resolve-plan``: cleanup, BatchNorm folding, ...); every node the base plan (``--plan``, default W8A8)
   quantizes with a constant weight is a layer to decide. Each candidate (``--candidates``: ``fp32`` keeps the
   layer float, ``int8`` / ``int4`` / ... set the weight dtype, ``binary`` / ``ternary`` / ``shiftN`` the
   low-bit scheme of :mod:`qcompiler.quant.schemes`) is checked per layer against the target; a candidate the
   target supports on no layer is refused with its reason, one unsupported on some layers is dropped there.
2. **Sensitivity** of every (layer, candidate): :mod:`qcompiler.autoplan.sensitivity` (``--metric pd | hessian |
   act-stats | orthogonality``) on the first ``samples`` calibration samples. ``pd`` also gives each sample's
   share of every distortion; when they rest on fewer than :data:`MIN_ESS` effective samples (Kish's
   ``(Σd)²/Σd²``, median over the evaluations — a confident classifier, whose outputs only move on the few
   samples near a decision boundary), they are measured again, once, on :data:`SAMPLE_GROWTH` times the samples
   (at most ``max_samples``). Candidates may fix the weight granularity (``int4/tensor``, ``int8/channel``,
   ``int4/block64``): one scale per tensor costs a few bytes where per-channel scales cost 5 bytes per channel.
3. **Costs**, counted exactly as ``qcompiler inspect --cost`` counts them (:mod:`qcompiler.report.cost`): one probe
   compile per candidate (every layer at that candidate; calibration on one sample — sizes do not depend on the
   calibration values) gives each layer's stored bytes under each candidate; what is left (graph structure,
   activation scales, other ops' tensors) is the float probe's remainder plus, per layer, the candidate's
   extra structure (its probe's remainder minus the float one, shared evenly over the layers it quantized).
   BitOps per layer likewise (MACs at the calibration feed shape × weight bits × activation bits); average
   weight bits from the parameter counts.
4. **Allocation**: multiple-choice knapsack over the sensitivities (:mod:`qcompiler.autoplan.knapsack`: exact DP over
   the discretized budget, costs rounded up; or ``--solver lagrange``), minimizing the summed sensitivity;
   plus the whole Pareto front.
5. **Verification**: the plan is compiled the same way and measured with :func:`qcompiler.report.cost.model_cost`;
   if it does not fit (the additive model is a few bytes off for a mixed plan), the budget given to the
   solver is lowered by the excess and the plan re-solved, so the written plan never exceeds the budget.

Budgets (:class:`Budget`): bytes of the output files (``4000000``, ``4MB`` — KB/MB/GB are 1024-based, as in
``inspect``), a fraction of the float model's bytes (``25%``), average weight bits (``4.5bits``), or with
``--bitops`` BitOps (``1.5G`` — k/M/G/T decimal — or ``50%`` of the float model's BitOps).

The plan written is an ordinary plan file: the base plan's defaults and rules, then one rule per layer
matched by ``name``, each preceded by a comment with the layer's sensitivity and bytes for every candidate.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from qcompiler import __version__, ir
from qcompiler.autoplan import knapsack
from qcompiler.autoplan.sensitivity import METRICS, LayerUnderTest, SensitivityResult, compute
from qcompiler.core.errors import UserError
from qcompiler.plan import DTYPES, NodePlan, Plan, QuantSpec, _make_spec, load_plan
from qcompiler.report import cost

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
BUDGET_KINDS = ("bytes", "fraction", "bits", "bitops", "bitops-fraction")
DEFAULT_CANDIDATES = "int8,int4"
SOLVERS = ("dp", "lagrange")
_BINARY_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
                 "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_DECIMAL_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
#: verification rounds before giving up
MAX_ROUNDS = 12
#: pd: fewest effective samples (Kish, over the per-sample distortions) a sensitivity may rest on before the
#: planner measures again on SAMPLE_GROWTH times the samples (at most ``PlanOptions.max_samples``)
MIN_ESS = 2.0
SAMPLE_GROWTH = 4


# ----------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class Budget:
    """A parsed ``--budget``: ``kind`` in :data:`BUDGET_KINDS`, ``value`` in its unit (fractions in [0, 1])."""

    kind: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str, *, bitops: bool = False) -> Budget:
        s = str(text).strip()
        low = s.lower().replace(" ", "")
        if not low:
            raise UserError("--budget: empty")
        if low.endswith("%"):
            try:
                pct = float(low[:-1])
            except ValueError:
                raise UserError(f"--budget: '{s}' is not a percentage") from None
            if not (0.0 < pct <= 100.0) or not math.isfinite(pct):
                raise UserError(f"--budget: a percentage must be in (0, 100], got '{s}'")
            return cls("bitops-fraction" if bitops else "fraction", pct / 100.0, s)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(bits?)", low)
        if m:
            if bitops:
                raise UserError(f"--budget: '{s}' is average weight bits, which --bitops does not take")
            bits = float(m.group(1))
            if not (0.0 < bits <= 32.0):
                raise UserError(f"--budget: average weight bits must be in (0, 32], got '{s}'")
            return cls("bits", bits, s)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]*)", low)
        if not m:
            raise UserError(f"--budget: cannot read '{s}' (bytes like 4000000 or 4MB, a fraction like 25%, "
                            "average weight bits like 4.5bits, or BitOps with --bitops)")
        num, unit = float(m.group(1)), m.group(2)
        if bitops:
            if unit not in _DECIMAL_UNITS:
                raise UserError(f"--budget: unknown BitOps unit '{m.group(2)}' in '{s}' (k, M, G, T)")
            value = num * _DECIMAL_UNITS[unit]
            kind = "bitops"
        else:
            if unit not in _BINARY_UNITS:
                raise UserError(f"--budget: unknown size unit '{m.group(2)}' in '{s}' (B, KB, MB, GB; 1024-based)")
            value = num * _BINARY_UNITS[unit]
            kind = "bytes"
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--budget: must be positive, got '{s}'")
        return cls(kind, float(math.floor(value)) if kind == "bytes" else value, s)

    @property
    def unit(self) -> str:
        """What the budget counts: ``bytes``, ``bits`` (parameter-weighted) or ``bitops``."""
        return {"bytes": "bytes", "fraction": "bytes", "bits": "bits", "bitops": "bitops",
                "bitops-fraction": "bitops"}[self.kind]

    def describe(self) -> str:
        if self.kind == "bytes":
            return f"{int(self.value)} bytes ({cost.format_bytes(self.value)})"
        if self.kind == "fraction":
            return f"{self.value * 100:g}% of the float model's bytes"
        if self.kind == "bits":
            return f"{self.value:g} average weight bits"
        if self.kind == "bitops":
            return f"{cost.format_count(self.value)} BitOps"
        return f"{self.value * 100:g}% of the float model's BitOps"


# ------------------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One precision a layer may take: ``weight`` = the plan keys it sets (``None``: keep the layer float)."""

    name: str
    weight: tuple[tuple[str, Any], ...] | None

    @property
    def is_float(self) -> bool:
        return self.weight is None

    def keys(self) -> dict[str, Any]:
        return dict(self.weight or ())

    @property
    def lowbit(self) -> bool:
        return self.keys().get("scheme", "int") != "int"


def parse_candidates(text: str | Sequence[str]) -> list[Candidate]:
    """``"fp32,int8,int4,ternary,binary,shift4"`` -> candidates (order kept, duplicates refused)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if not items:
        raise UserError("--candidates: empty list")
    out: list[Candidate] = []
    for raw in items:
        name, _, gran = raw.lower().partition("/")
        if name in ("fp32", "float", "float32"):
            cand = Candidate("fp32", None)
        elif name in DTYPES and name != "float":
            cand = Candidate(name, (("dtype", name), ("scheme", "int")))
        elif name in ("binary", "ternary"):
            cand = Candidate(name, (("scheme", name),))
        elif re.fullmatch(r"int[0-9]+", name) and name not in DTYPES:
            from qcompiler.plan import UNIFORM_BITS

            bits = int(name[3:])
            if bits not in UNIFORM_BITS:
                raise UserError(f"--candidates: '{raw}': unknown integer width (int8, int4, and the uniform "
                                f"{', '.join(f'int{b}' for b in UNIFORM_BITS)} of the packed target)")
            cand = Candidate(name, (("scheme", "uniform"), ("bits", bits)))
        elif re.fullmatch(r"shift[0-9]*", name):
            bits = int(name[5:] or 4)
            from qcompiler.plan import SHIFT_BITS

            if bits not in SHIFT_BITS:
                raise UserError(f"--candidates: '{raw}': shift takes {', '.join(map(str, SHIFT_BITS))} bits")
            cand = Candidate(f"shift{bits}", (("scheme", "shift"), ("bits", bits)))
        else:
            raise UserError(f"--candidates: unknown candidate '{raw}' (fp32, int8, int4, uint8, uint4, int16, "
                            "fp8e4m3, fp8e5m2, int3, int2, binary, ternary, shift2..shift4)")
        if gran:
            cand = _with_granularity(cand, gran, raw)
        if cand.lowbit:
            try:
                import qcompiler.quant.schemes  # noqa: F401
            except ImportError:  # pragma: no cover - schemes ship with qcompiler
                raise UserError(f"--candidates: '{raw}' needs the low-bit schemes (qcompiler.quant.schemes), "
                                "which this installation lacks") from None
        if any(c.name == cand.name for c in out):
            raise UserError(f"--candidates: '{raw}' given twice")
        out.append(cand)
    return out


#: ``--candidates`` granularity suffixes (``int4/tensor``, ``int8/channel``, ``int4/block64``)
_GRANULARITY_SUFFIX = {"tensor": "per_tensor", "pt": "per_tensor", "channel": "per_channel", "pc": "per_channel"}


def _with_granularity(cand: Candidate, gran: str, raw: str) -> Candidate:
    """``cand`` with its weight granularity fixed by a ``/tensor``, ``/channel`` or ``/blockN`` suffix."""
    if cand.is_float:
        raise UserError(f"--candidates: '{raw}': fp32 has no granularity")
    m = re.fullmatch(r"block([0-9]+)", gran)
    if gran in _GRANULARITY_SUFFIX:
        keys: tuple[tuple[str, Any], ...] = (("granularity", _GRANULARITY_SUFFIX[gran]),)
        label = "tensor" if keys[0][1] == "per_tensor" else "channel"
    elif m and not cand.lowbit and int(m.group(1)) >= 2:
        keys = (("granularity", "block"), ("block_size", int(m.group(1))))
        label = f"block{int(m.group(1))}"
    else:
        raise UserError(f"--candidates: '{raw}': the granularity suffix must be /tensor, /channel or /blockN "
                        "(N >= 2; int dtypes only)")
    return Candidate(f"{cand.name}/{label}", (*(cand.weight or ()), *keys))


# --------------------------------------------------------------------------------------------- options
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
    #: sensitivities re-measured around the plan, each candidate exchange measured whole (see :func:`_exchange`)
    exchange: int = 0
    seed: int = 0
    resolution: int = knapsack.DEFAULT_RESOLUTION


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
            raise UserError(f"--budget: the compiled model takes {_fmt_unit(float(got), self.unit)}, over the "
                            f"budget of {_fmt_unit(self.budget_value, self.unit)}; nothing written")

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model, "target": self.target, "budget": self.budget.text, "budget_kind": self.budget.kind,
            "budget_value": self.budget_value, "unit": self.unit, "metric": self.sensitivity.metric,
            "candidates": list(self.candidates), "counts": self.counts(),
            "predicted": _jsonable(self.predicted), "verified": _jsonable(self.verified),
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
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ------------------------------------------------------------------------------------------- preparing
@dataclass
class Prepared:
    graph: Any
    meta: Any
    base: Plan
    target: Any
    nodes: dict[str, Any]  # NodePlan per planned layer
    layers: list[LayerInfo]
    specs: list[dict[str, QuantSpec | None]]  # per layer: candidate -> spec
    model_path: Path
    #: candidates left out because the target runs them on no layer (``prepare(drop_unsupported=True)``)
    dropped: list[str] = field(default_factory=list)


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    return asdict(spec)


def prepare(model_path: str | Path, candidates: Sequence[Candidate], *, target: str = "ort",
            base_plan: str | Path | Plan | None = None, drop_unsupported: bool = False) -> Prepared:
    """The float graph as ``compile`` resolves plans on it, the layers to decide and each one's candidates.

    A candidate the target runs on no layer is an error naming it, or, with ``drop_unsupported`` (the default
    candidate list, which the user did not choose), left out with a warning (listed in ``Prepared.dropped``)."""
    from qcompiler.core.context import CompileContext
    from qcompiler.core.pass_manager import PassManager
    from qcompiler.core.registry import build_pipeline, get_target, parse_pipeline_text

    src = Path(model_path)
    tgt = get_target(target)
    base = base_plan if isinstance(base_plan, Plan) else load_plan(base_plan)
    model = ir.load_model(src)
    graph, meta = ir.import_graph(model, str(src))
    ir.to_float32(graph)
    steps = [name for name, _ in parse_pipeline_text(tgt.default_pipeline)]
    prefix = steps[: steps.index("resolve-plan") + 1] if "resolve-plan" in steps else ["cleanup", "resolve-plan"]
    items = parse_pipeline_text(tgt.default_pipeline)[: len(prefix)]
    text = ",".join(name if not opts else name + "{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}"
                    for name, opts in items)
    ctx = CompileContext(graph=graph, meta=meta, plan=base, target=tgt)
    PassManager(build_pipeline(text)).run(ctx)
    assert ctx.resolved is not None
    by_name = {n.name: n for n in ctx.graph.nodes}
    layers: list[LayerInfo] = []
    specs: list[dict[str, QuantSpec | None]] = []
    nodes: dict[str, Any] = {}
    refused_everywhere: dict[str, str] = {}
    for np_ in ctx.resolved.nodes.values():
        if np_.weight is None or not np_.weight_inputs:
            continue
        node = by_name.get(np_.node)
        if node is None:
            continue
        base_w = _spec_dict(np_.weight)
        allowed: dict[str, QuantSpec | None] = {}
        refused: dict[str, str] = {}
        for cand in candidates:
            if cand.is_float:
                allowed[cand.name] = None
                continue
            merged = {**base_w, **cand.keys()}
            if cand.lowbit and merged.get("granularity") == "block":
                merged["granularity"] = "per_channel"
            if cand.lowbit and merged.get("dtype") in ("fp8e4m3", "fp8e5m2", "float"):
                merged["dtype"] = "int8"
            try:
                spec = _make_spec(merged, f"candidate {cand.name} for node '{np_.node}'")
                trial = NodePlan(node=np_.node, op_type=np_.op_type, weight=spec, activation=np_.activation,
                                 rules=[f"candidate {cand.name}"], weight_inputs=np_.weight_inputs,
                                 activation_inputs=np_.activation_inputs)
                tgt.check_node(trial)
            except UserError as e:
                refused[cand.name] = str(e)
                refused_everywhere.setdefault(cand.name, str(e))
                continue
            allowed[cand.name] = spec
        params = int(sum(int(np.prod(node.inputs[i].shape)) for i in np_.weight_inputs))
        layers.append(LayerInfo(name=np_.node, op_type=np_.op_type, params=params, macs=0,
                                allowed=[c.name for c in candidates if c.name in allowed], refused=refused,
                                base_weight=base_w, activation=np_.activation))
        specs.append(allowed)
        nodes[np_.node] = np_
    if not layers:
        raise UserError(f"{src}: no layer to plan (the base plan quantizes no Conv / ConvTranspose / Gemm / "
                        "MatMul / LSTM / GRU / RNN with a constant weight)")
    dropped: list[str] = []
    for cand in candidates:
        if not cand.is_float and not any(cand.name in la.allowed for la in layers):
            why = refused_everywhere.get(cand.name, "refused")
            if not drop_unsupported:
                raise UserError(f"--candidates: '{cand.name}' is not supported by target '{target}' on any layer: "
                                f"{why}")
            log.warning("candidate %s left out: target '%s' runs it on no layer (%s)", cand.name, target, why)
            dropped.append(cand.name)
    for la in layers:
        if not la.allowed:
            raise UserError(f"node '{la.name}': none of the candidates is supported by target '{target}' "
                            f"({next(iter(la.refused.values()), '')}); add fp32 to --candidates")
    return Prepared(graph=ctx.graph, meta=meta, base=base, target=tgt, nodes=nodes, layers=layers, specs=specs,
                    model_path=src, dropped=dropped)


# ---------------------------------------------------------------------------------------------- plans
def _flow(d: Any) -> str:
    return yaml.safe_dump(d, default_flow_style=True, width=100000, sort_keys=False).strip()


def _rule_keys(cand: Candidate, spec: QuantSpec | None, base_w: dict[str, Any]) -> dict[str, Any]:
    """The weight keys a layer's rule must set so that the plan resolves to ``spec``."""
    if spec is None:
        return {}
    d = _spec_dict(spec)
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
    """YAML of a plan: header comments, the base plan's defaults / algorithms / rules, then ``rules`` (one per
    layer, each after its comment line)."""
    base = prep.base.to_dict()
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(f"version: {base['version']}")
    lines.append("defaults:")
    lines.append(f"  weight: {_flow(base['defaults']['weight'])}")
    lines.append(f"  activation: {_flow(base['defaults']['activation'])}")
    if base.get("algorithms"):
        lines.append(f"algorithms: {_flow(base['algorithms'])}")
    lines.append("rules:")
    if base["rules"]:
        lines.append("  # rules of the base plan")
        for r in base["rules"]:
            lines.append(f"  - {_flow(r)}")
    for i, rule in enumerate(rules):
        if comments is not None:
            lines.append(f"  # {comments[i]}")
        lines.append(f"  - {_flow(rule)}")
    return "\n".join(lines) + "\n"


def _comments(prep: Prepared, names: Sequence[str], choice: Sequence[int], sens: SensitivityResult,
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


def _probe_text(prep: Prepared, rules: list[list[dict[str, Any] | None]], ci: int) -> str:
    """A probe plan: every layer at candidate ``ci`` where the target allows it, float elsewhere."""
    chosen = [row[ci] if row[ci] is not None else {"match": {"name": prep.layers[li].name}, "skip": True}
              for li, row in enumerate(rules)]
    return plan_text(prep, [r for r in chosen if r is not None], [])


_ACTIVATION_OPS = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh", "HardSwish", "PRelu")


def output_quant(prep: Prepared, cands: Sequence[Candidate], rules: list[list[dict[str, Any] | None]]
                 ) -> list[dict[str, tuple[str, QuantSpec]]]:
    """Per layer: candidate -> (tensor, spec) the target quantizes downstream of the layer when it takes that
    candidate (``Target.output_tensors`` on the probe plan; e.g. ``ort``'s QLinearConv output for int8 Conv)."""
    from qcompiler.core.context import CompileContext

    out: list[dict[str, tuple[str, QuantSpec]]] = [{} for _ in prep.layers]
    by_name = {n.name: n for n in prep.graph.nodes}
    for ci, cand in enumerate(cands):
        if cand.is_float:
            continue
        plan = Plan.from_text(_probe_text(prep, rules, ci), source="<probe>")
        ctx = CompileContext(graph=prep.graph, meta=prep.meta, plan=plan, target=prep.target,
                             resolved=plan.resolve(prep.graph))
        outs = prep.target.output_tensors(ctx)
        if not outs:
            continue
        for li, la in enumerate(prep.layers):
            node = by_name.get(la.name)
            if rules[li][ci] is None or node is None or not node.outputs:
                continue
            t: Any = node.outputs[0]
            chain = [t]
            while len(t.outputs) == 1 and t.outputs[0].op in _ACTIVATION_OPS and t.outputs[0].outputs:
                t = t.outputs[0].outputs[0]
                chain.append(t)
            hit = next((x.name for x in chain if x.name in outs), None)
            if hit is not None:
                out[li][cand.name] = (hit, outs[hit])
    return out


# ------------------------------------------------------------------------------------------- compiling
#: ops a weight's dequantization chain never passes through (the layer itself, or another layer)
_LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "QLinearConv",
                        "QLinearMatMul", "MatMulNBits", "MatMulInteger", "ConvInteger"})


def weight_owners(graph: Any, layers: set[str]) -> dict[str, str]:
    """Nodes of a compiled graph whose outputs reach exactly one node, through single-reader chains of non-layer
    ops, and that node is one of ``layers`` -> that layer. A target may dequantize a weight with ops of its own
    (``Cast`` + ``Mul`` at load time, say); ``inspect --cost`` gives their stored tensors to the first reader,
    the planner gives them to the layer the chain feeds."""
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.name in layers or node.op in _LAYER_OPS or (node.domain or "") not in ("", "ai.onnx"):
            continue
        cur = node
        for _ in range(16):
            readers = [r for t in cur.outputs for r in t.outputs]
            if len(readers) != 1:
                break
            cur = readers[0]
            if cur.name in layers:
                out[node.name] = cur.name
                break
            if cur.op in _LAYER_OPS or (cur.domain or "") not in ("", "ai.onnx"):
                break
    return out


def _cost_from_json(cj: dict[str, Any]) -> cost.CostReport:
    """A compile report's ``cost`` section (``CostReport.to_json()``) back as a :class:`~qcompiler.report.cost.CostReport`."""
    keys = ("name", "op_type", "bytes", "params", "macs", "weight_bits", "act_bits", "weight_format")
    layers = [cost.LayerCost(**{k: lc[k] for k in keys if k in lc}) for lc in cj.get("layers", [])]
    return cost.CostReport(layers=layers, total_bytes=int(cj["total_bytes"]), tensor_bytes=int(cj["tensor_bytes"]),
                           unattributed_bytes=int(cj.get("unattributed_bytes", 0)),
                           peak_activation_bytes=cj.get("peak_activation_bytes"), peak_at=cj.get("peak_at"),
                           feed_shapes={k: list(v) for k, v in cj.get("feed_shapes", {}).items()},
                           shapes_from=str(cj.get("shapes_from", "none")), files=list(cj.get("files", [])),
                           notes=list(cj.get("notes", [])))


class _Workdir:
    """A temporary folder with the one-sample calibration file the probe compiles use."""

    def __init__(self, feed: dict[str, np.ndarray]) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="qcompiler-autoplan-"))
        self.calib = self.path / "calib1.npz"
        arrays: dict[str, Any] = {k: np.asarray(v)[None] for k, v in feed.items()}
        np.savez(self.calib, **arrays)
        self.n = 0
        #: after :meth:`compile` with ``layers``: cost-report entry -> the layer whose weight it only feeds
        self.owners: dict[str, str] = {}

    def compile(self, model: Path, plan: Plan, target: str, *, shapes: dict[str, list[int]] | None,
                want_shapes: bool, layers: set[str] | None = None) -> tuple[cost.CostReport, dict[str, Any]]:
        from qcompiler.api import CompileOptions, compile_model

        self.n += 1
        out = self.path / f"probe{self.n}.onnx"
        res = compile_model(model, out, CompileOptions(plan=plan, target=target, calib=str(self.calib),
                                                       calib_samples=1, validate=False))
        files = [f for f in res.files if f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")]
        cj = res.report.get("cost")
        if cj is not None and (not want_shapes or (cj.get("shapes_from") != "none" and cj.get("macs")
                                                   and cj.get("feed_shapes") == shapes)):
            rep = _cost_from_json(cj)  # the compile counted it already (at the calibration sample's shapes)
        else:
            rep = cost.model_cost(out, files=files, feed_shapes=shapes, shapes=want_shapes)
        self.owners = weight_owners(ir.import_graph(ir.load_model(out))[0], layers) if layers else {}
        plan_rep = res.report.get("plan", {})
        for f in res.files:
            f.unlink(missing_ok=True)
        return rep, plan_rep

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ main
def calib_source(graph: Any, calib: str | Path | None, samples: int, seed: int) -> Any:
    """The calibration data as a (streaming) CalibrationSource; ``None`` / ``random``: ``samples`` seeded
    synthetic samples, with a warning."""
    from qcompiler.calib import CalibrationSource, input_signatures

    calib_arg = "random" if calib is None or str(calib) in ("none", "random") else calib
    if calib_arg == "random":
        log.warning("plan: no calibration data; sensitivities come from synthetic random inputs")
    return CalibrationSource.from_arg(calib_arg, input_signatures(graph), seed=seed, num_random=samples)


def first_feeds(source: Any, samples: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for i, f in enumerate(source):
        if i >= samples:
            break
        feeds.append({k: np.asarray(v) for k, v in f.items()})
    if not feeds:
        raise UserError(f"{source.description}: no calibration samples")
    return feeds


def load_feeds(graph: Any, calib: str | Path | None, samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` calibration feeds (``None`` / ``random``: seeded synthetic data, with a warning)."""
    return first_feeds(calib_source(graph, calib, samples, seed), samples)


def measure_sensitivity(graph: Any, lut: Sequence[LayerUnderTest], names: Sequence[str], ranges: Any,
                        opts: PlanOptions, progress: Progress | None = None
                        ) -> tuple[SensitivityResult, list[dict[str, np.ndarray]]]:
    """``opts.metric`` over the first ``opts.samples`` samples of ``ranges`` (activation ranges calibrated over all
    of it), and the feeds used. ``pd``: when the distortions rest on fewer than :data:`MIN_ESS` effective
    samples, measured again, once, on :data:`SAMPLE_GROWTH` times the samples (at most ``opts.max_samples``)."""
    feeds = first_feeds(ranges, opts.samples)

    def run(fs: list[dict[str, np.ndarray]]) -> SensitivityResult:
        return compute(opts.metric, graph, lut, names, fs, batch_size=opts.batch_size,
                       workers=opts.workers, draws=opts.draws, seed=opts.seed, range_source=ranges,
                       progress=(lambda d, n: progress(f"sensitivity ({opts.metric})", d, n)) if progress else None)

    sens = run(feeds)
    ess = sens.details.get("ess")
    if ess is not None and ess < MIN_ESS and opts.max_samples > len(feeds):
        # the distortions rest on one or two samples (a confident classifier: only the samples near its
        # decision boundary move its probabilities): measure again on more samples
        grown = first_feeds(ranges, min(opts.max_samples, len(feeds) * SAMPLE_GROWTH))
        if len(grown) > len(feeds):
            log.info("plan: the sensitivities rest on %.1f effective samples of %d; measuring again on %d",
                     ess, len(feeds), len(grown))
            first = {"samples": len(feeds), "ess": ess, "seconds": sens.seconds, "evaluations": sens.evaluations}
            feeds = grown
            sens = run(feeds)
            sens.details["first_pass"] = first
    return sens, feeds


def _reuse(sens: SensitivityResult, layers: Sequence[LayerInfo], names: Sequence[str]) -> SensitivityResult:
    """The columns of an earlier sensitivity result for these layers and candidates (NaN where not allowed)."""
    if [la.name for la in layers] != list(sens.layers) or any(n not in sens.candidates for n in names):
        raise ValueError("the given sensitivity result does not cover these layers and candidates")
    cols = [sens.candidates.index(n) for n in names]
    values = sens.values[:, cols].copy()
    noise = None if sens.noise is None else sens.noise[:, cols].copy()
    for li, la in enumerate(layers):
        for ci, n in enumerate(names):
            if n not in la.allowed:
                values[li, ci] = np.nan
                if noise is not None:
                    noise[li, ci] = np.nan
    return SensitivityResult(sens.metric, list(sens.layers), list(names), values, noise, sens.signal, sens.outputs,
                             sens.output_kinds, sens.samples, sens.batches, 0, 0.0, dict(sens.details))


def auto_plan(model_path: str | Path, calib: str | Path | None, options: PlanOptions, *,
              progress: Progress | None = None, sensitivity: SensitivityResult | None = None) -> AutoPlanResult:
    """Plan ``model_path`` under ``options.budget`` (see the module docstring). ``sensitivity``: reuse the
    sensitivities of an earlier run on the same model (a superset of the candidates) instead of measuring."""
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    opts = options
    if opts.metric not in METRICS:
        raise UserError(f"--metric: unknown metric '{opts.metric}' (one of: {', '.join(METRICS)})")
    if opts.solver not in SOLVERS:
        raise UserError(f"--solver: unknown solver '{opts.solver}' (one of: {', '.join(SOLVERS)})")
    if opts.samples <= 0:
        raise UserError(f"--samples: must be positive, got {opts.samples}")
    src = Path(model_path)
    cands = list(opts.candidates)
    names = [c.name for c in cands]

    t = time.perf_counter()
    prep = prepare(src, cands, target=opts.target, base_plan=opts.base_plan,
                   drop_unsupported=opts.default_candidates)
    if prep.dropped:
        cands = [c for c in cands if c.name not in prep.dropped]
        names = [c.name for c in cands]
    rules = layer_rules(prep, cands)
    # sensitivities on the first samples; activation ranges as the compile will calibrate them: over the whole
    # calibration data (one streaming pass)
    ranges = calib_source(prep.graph, calib, opts.samples, opts.seed)
    feeds = first_feeds(ranges, opts.samples)
    timings["prepare"] = time.perf_counter() - t

    # ---- sensitivity ------------------------------------------------------------------------------------
    t = time.perf_counter()
    by_name = {n.name: n for n in prep.graph.nodes}
    oq = output_quant(prep, cands, rules)
    lut = [LayerUnderTest(la.name, by_name[la.name], prep.nodes[la.name].weight_inputs, prep.specs[li],
                          prep.nodes[la.name].activation if 0 in prep.nodes[la.name].activation_inputs else None,
                          oq[li])
           for li, la in enumerate(prep.layers)]
    if sensitivity is not None:
        sens = _reuse(sensitivity, prep.layers, names)
        if sens.samples != len(feeds):
            feeds = first_feeds(ranges, sens.samples)
    else:
        sens, feeds = measure_sensitivity(prep.graph, lut, names, ranges, opts, progress)
    timings["sensitivity"] = time.perf_counter() - t
    # whole plans are compared on fresh samples (the knapsack fitted the first ones): the next 2 x samples
    n_sens = len(feeds)
    more = first_feeds(ranges, 3 * n_sens)[n_sens:] if opts.select else []
    select_feeds = more or feeds
    if opts.refine and opts.metric != "pd":
        raise UserError("--refine re-measures sensitivities around a plan with pd; use --metric pd")
    if opts.exchange and opts.metric != "pd":
        raise UserError("--exchange re-measures sensitivities around a plan with pd; use --metric pd")

    # ---- costs, allocation, verification ----------------------------------------------------------------
    unit = opts.budget.unit
    shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    work = _Workdir(feeds[0])
    try:
        t = time.perf_counter()
        table, base, float_totals = _cost_tables(prep, cands, rules, work, shapes, unit == "bitops", progress)
        timings["costs"] = time.perf_counter() - t
        budget_value = _absolute_budget(opts.budget, float_totals)
        cap = _capacity(unit, budget_value, base)
        t = time.perf_counter()
        refined = 0
        if opts.refine:
            # Sensitivities measured one layer at a time add up well for small errors; where many layers are
            # coarse they compound. Re-measure every (layer, candidate) as a change from the plan found, re-solve.
            current = _solve(sens.values, table[unit], cap, opts)
            for _ in range(opts.refine):
                if current is None:
                    break
                ctx_sens = compute("pd", prep.graph, lut, names, feeds, batch_size=opts.batch_size,
                                   workers=opts.workers, seed=opts.seed, context=current, range_source=ranges,
                                   progress=(lambda d, n: progress("refine (pd around the plan)", d, n))
                                   if progress else None)
                nxt = _solve(ctx_sens.values, table[unit], cap, opts)
                refined += 1
                sens = ctx_sens
                if nxt is None or nxt == current:
                    break
                current = nxt
        timings["refine"] = time.perf_counter() - t
        values = sens.values
        t = time.perf_counter()
        verified: dict[str, Any] = {}
        choice: list[int] | None = None
        text = ""
        rounds = 0
        joint: dict[tuple[int, ...], tuple[float, np.ndarray]] = {}
        select_state: dict[str, Any] = {}
        raw_front = _front_points(values, table, base, sens, unit, opts)
        pool_front = sorted(raw_front, key=_unit_key(unit)) if opts.select else []
        while True:
            rounds += 1
            choice = _solve(values, table[unit], cap, opts)
            if choice is None:
                cheapest = _cheapest(unit, table, base)
                raise UserError(f"--budget: {opts.budget.describe()} = {_fmt_unit(budget_value, unit)} is below "
                                f"the smallest plan this model allows ({_fmt_unit(cheapest, unit)} with every "
                                f"layer at its cheapest candidate of {', '.join(names)})")
            if opts.select:
                choice = _select(choice, cap, pool_front, table[unit], values, opts, joint, prep, lut, names,
                                 select_feeds, sens, progress, ranges, select_feeds is not feeds, select_state)
            if opts.exchange:
                choice = _exchange(choice, cap, table[unit], opts, joint, prep, lut, names, feeds, select_feeds, sens,
                                   progress, ranges, select_state)
            predicted = _predict(choice, table, base, values, sens)
            if tuple(choice) in joint and "signal" in select_state:
                predicted["joint_sqnr_db"] = _sqnr(select_state["signal"], joint[tuple(choice)][1])
            header = _header(src, opts, budget_value, unit, predicted, names, choice)
            text = plan_text(prep, [rules[li][ci] for li, ci in enumerate(choice)],  # type: ignore[misc]
                             header, _comments(prep, names, choice, sens, table))
            plan = Plan.from_text(text, source="<auto plan>")
            if progress:
                progress("verify", rounds - 1, MAX_ROUNDS)
            rep, plan_rep = work.compile(src, plan, opts.target, shapes=shapes, want_shapes=unit == "bitops")
            if plan_rep.get("unmatched_rules"):
                raise RuntimeError("auto plan: rules match no node after compile preparation: "
                                   f"{plan_rep['unmatched_rules'][:3]} (node names changed)")
            verified = {"bytes": rep.total_bytes, "bitops": rep.bitops if unit == "bitops" else None,
                        "avg_bits": predicted["avg_bits"], "rounds": rounds}
            got = {"bytes": float(rep.total_bytes), "bitops": float(rep.bitops), "bits": predicted["avg_bits"]}[unit]
            if got <= budget_value:
                break
            if rounds >= MAX_ROUNDS:
                raise RuntimeError(f"auto plan: could not fit {opts.budget.describe()} in {MAX_ROUNDS} rounds")
            excess = got - budget_value
            log.info("plan: round %d is %s over the budget; tightening", rounds, _fmt_unit(excess, unit))
            used = float(sum(table[unit][li, ci] for li, ci in enumerate(choice)))
            cap = min(cap, used) - excess - (1.0 if unit == "bytes" else abs(used) * 1e-6)
        timings["allocate"] = time.perf_counter() - t
        t = time.perf_counter()
        front = _front(values, table, base, sens, unit, choice, opts, raw_front)
        timings["front"] = time.perf_counter() - t
    finally:
        work.close()
    timings["total"] = time.perf_counter() - t_all
    if progress:
        progress("verify", MAX_ROUNDS, MAX_ROUNDS)
    return AutoPlanResult(text=text, plan=plan, budget=opts.budget, budget_value=budget_value, unit=unit,
                          layers=prep.layers, candidates=names, choice=list(choice), cost_table=table, base=base,
                          sensitivity=sens, predicted=predicted,
                          verified=verified, front=front, timings=timings, float_totals=float_totals,
                          model=str(src), target=opts.target, rules=rules, rounds=rounds)


def _sqnr(signal: np.ndarray, noise: np.ndarray) -> float:
    worst = math.inf
    for o in range(len(noise)):
        if noise[o] > 0:
            worst = min(worst, 10.0 * math.log10(max(float(signal[o]), 1e-300) / float(noise[o])))
    return worst


def _select(choice: list[int], cap: float, front: Sequence[FrontPoint], costs: np.ndarray, values: np.ndarray,
            opts: PlanOptions, joint: dict[tuple[int, ...], tuple[float, np.ndarray]], prep: Prepared,
            lut: Sequence[LayerUnderTest], names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
            sens: SensitivityResult, progress: Progress | None, ranges: Any, fresh: bool,
            state: dict[str, Any]) -> list[int]:
    """Among the knapsack's plan, the ``opts.select`` Pareto points nearest the budget that fit, and every uniform
    plan that fits, the one with the least distortion *measured with all its layers quantized together* (the
    sensitivities are measured one layer at a time and only added; where coarse layers compound, the sum
    misleads). Measured results are cached in ``joint``."""
    def used(ch: Sequence[int]) -> float:
        return float(sum(costs[li, ci] for li, ci in enumerate(ch)))

    pool: list[list[int]] = [list(choice)]
    fits = [list(p.choice) for p in front if used(p.choice) <= cap + 1e-9]
    pool += fits[-opts.select:]
    for ci in range(costs.shape[1]):
        uniform = [ci] * costs.shape[0]
        if all(np.isfinite(costs[li, ci]) and np.isfinite(values[li, ci]) for li in range(costs.shape[0])) \
                and used(uniform) <= cap + 1e-9:
            pool.append(uniform)
    unique: list[tuple[int, ...]] = list(dict.fromkeys(tuple(p) for p in pool))
    _measure_whole(unique, opts, joint, prep, lut, names, feeds, sens, progress, ranges, fresh, state,
                   "select (whole plans measured)")
    best = min(unique, key=lambda p: (joint[p][0], used(p)))
    if list(best) != list(choice):
        log.info("plan: measured together, a neighbouring plan beats the knapsack's (%.4g vs %.4g)",
                 joint[best][0], joint[tuple(choice)][0])
    return list(best)


def _measure_whole(plans: Sequence[tuple[int, ...]], opts: PlanOptions,
                   joint: dict[tuple[int, ...], tuple[float, np.ndarray]], prep: Prepared,
                   lut: Sequence[LayerUnderTest], names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
                   sens: SensitivityResult, progress: Progress | None, ranges: Any, fresh: bool,
                   state: dict[str, Any], label: str) -> None:
    """Measure the ``plans`` not in ``joint`` whole on ``feeds`` (the session of ``state`` / of the sensitivity
    pass, rebound to them when ``fresh``), into ``joint``."""
    todo = [p for p in dict.fromkeys(plans) if p not in joint]
    if not todo:
        return
    from qcompiler.autoplan.sensitivity import measure_plans

    runner = state.get("runner") or (None if fresh else sens.runner)
    res, runner = measure_plans(prep.graph, lut, names, feeds, todo, runner=runner, workers=opts.workers,
                                batch_size=opts.batch_size, range_source=ranges,
                                qparams=sens.runner.activation_qparams if sens.runner is not None else None,
                                base=sens.runner if fresh else None,
                                progress=(lambda d, n: progress(label, d, n)) if progress else None)
    state["runner"] = runner
    state["signal"] = runner.signal
    joint.update(zip(todo, res))


def _exchange(choice: list[int], cap: float, costs: np.ndarray, opts: PlanOptions,
              joint: dict[tuple[int, ...], tuple[float, np.ndarray]], prep: Prepared, lut: Sequence[LayerUnderTest],
              names: Sequence[str], sens_feeds: Sequence[dict[str, np.ndarray]],
              feeds: Sequence[dict[str, np.ndarray]], sens: SensitivityResult, progress: Progress | None,
              ranges: Any, state: dict[str, Any]) -> list[int]:
    """Measured exchanges around ``choice`` (``opts.exchange`` rounds at most): the sensitivities are measured again
    around the plan (pd with the plan as context: the change of the distortion when one layer alone switches);
    each exchange upgrades one layer and pays for it, where the budget needs it, with the downgrades that cost
    the least distortion per unit saved (one per layer); the ``opts.select`` (at least 4) exchanges predicted
    best are measured whole on ``feeds`` with the plan, and the best of them replaces the plan if it is less
    distorted than the plan, measured. A first-order step kept small (a few layers), and checked, where
    re-solving the whole knapsack from first-order changes (``refine``) moves many layers at once."""
    current = [int(c) for c in choice]
    n_l, n_c = costs.shape
    fresh = feeds is not sens_feeds
    for _ in range(opts.exchange):
        ctx = compute("pd", prep.graph, lut, names, sens_feeds, batch_size=opts.batch_size, workers=opts.workers,
                      seed=opts.seed, context=current, range_source=ranges,
                      progress=(lambda d, n: progress("exchange (pd around the plan)", d, n)) if progress else None)
        dv = ctx.values
        slack = cap - float(sum(costs[li, ci] for li, ci in enumerate(current)))

        def ok(li: int, ci: int, current: list[int] = current, dv: np.ndarray = dv) -> bool:
            return ci != current[li] and bool(np.isfinite(dv[li, ci]) and np.isfinite(costs[li, ci]))

        def saved(li: int, ci: int, current: list[int] = current) -> float:
            return float(costs[li, current[li]] - costs[li, ci])

        downs = sorted((float(dv[li, ci]) / saved(li, ci), li, ci) for li in range(n_l) for ci in range(n_c)
                       if ok(li, ci) and saved(li, ci) > 0)
        moves: dict[tuple[int, ...], float] = {}
        for li in range(n_l):
            for ci in range(n_c):
                if not ok(li, ci) or dv[li, ci] >= 0:
                    continue
                plan, gain, need, taken = list(current), float(dv[li, ci]), -saved(li, ci) - slack, {li}
                plan[li] = ci
                for _, l2, c2 in downs:
                    if need <= 0:
                        break
                    if l2 not in taken:
                        plan[l2], gain, need = c2, gain + float(dv[l2, c2]), need - saved(l2, c2)
                        taken.add(l2)
                if need <= 1e-9 and gain < 0:
                    moves[tuple(plan)] = min(gain, moves.get(tuple(plan), 0.0))
        best_moves = sorted(moves, key=lambda p: moves[p])[: max(opts.select, 4)]
        if not best_moves:
            break
        pool = [tuple(current), *best_moves]
        _measure_whole(pool, opts, joint, prep, lut, names, feeds, sens, progress, ranges, fresh, state,
                       "exchange (whole plans measured)")
        best = min(pool, key=lambda p: joint[p][0])
        if best == tuple(current):
            break
        log.info("plan: a measured exchange lowers the distortion (%.4g -> %.4g)", joint[tuple(current)][0],
                 joint[best][0])
        current = list(best)
    return current


def _fmt_unit(x: float, unit: str) -> str:
    if unit == "bytes":
        return f"{round(x)} bytes ({cost.format_bytes(x)})"
    if unit == "bitops":
        return f"{cost.format_count(x)} BitOps"
    return f"{x:.3f} average weight bits"


def _header(src: Path, opts: PlanOptions, budget_value: float, unit: str, predicted: dict[str, Any],
            names: Sequence[str], choice: Sequence[int]) -> list[str]:
    counts = dict.fromkeys(names, 0)
    for ci in choice:
        counts[names[ci]] += 1
    sq = predicted.get("sqnr_db")
    return [
        f"Mixed-precision plan written by `qcompiler plan` (qcompiler {__version__}).",
        f"model: {src.name}   target: {opts.target}   metric: {opts.metric}   candidates: {', '.join(names)}",
        f"budget: {opts.budget.text} = {_fmt_unit(budget_value, unit)}"
        + ("  (model file bytes, as `qcompiler inspect --cost` counts them)" if unit == "bytes" else ""),
        f"predicted: {round(predicted['bytes'])} bytes, {cost.format_count(predicted['bitops'])} BitOps, "
        f"{predicted['avg_bits']:.3f} avg weight bits"
        + (f", output SQNR {sq:.2f} dB" if sq is not None and math.isfinite(sq) else "")
        + (f" (measured whole on other calibration samples: {predicted['joint_sqnr_db']:.2f} dB)"
           if predicted.get("joint_sqnr_db") is not None and math.isfinite(predicted["joint_sqnr_db"]) else ""),
        "layers: " + ", ".join(f"{n} x{c}" for n, c in counts.items() if c),
        "Each rule's comment: the layer's sensitivity s (predicted output distortion when only that layer is",
        "quantized: mean KL for probability outputs, relative MSE otherwise) and stored bytes B per candidate;",
        "* marks the choice. Edit freely; `qcompiler compile MODEL --plan THIS_FILE` compiles it.",
        "",
    ]


def _cost_tables(prep: Prepared, cands: Sequence[Candidate], rules: list[list[dict[str, Any] | None]],
                 work: _Workdir, shapes: dict[str, list[int]], want_bitops: bool, progress: Progress | None
                 ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, float]]:
    """Per (layer, candidate) bytes / BitOps / parameter-bits, and the plan-independent base of each.

    Bytes are measured on probe compiles (see the module docstring). BitOps of a layer are its MACs (from the
    float probe, at the calibration feed shape) × the candidate's weight bits × its activation bits (the base
    plan's activation spec; 32 when the layer stays float) — what ``inspect --cost`` counts for it, except that
    a float layer reading an activation another layer quantized is counted at 32 bits here (an upper bound).
    """
    n_l, n_c = len(prep.layers), len(cands)
    tbytes = np.full((n_l, n_c), np.nan)
    tbitops = np.full((n_l, n_c), np.nan)
    tbits = np.full((n_l, n_c), np.nan)
    float_rules = [{"match": {"name": la.name}, "skip": True} for la in prep.layers]
    probes: list[tuple[int | None, str]] = [(None, plan_text(prep, float_rules, []))]
    probes += [(ci, _probe_text(prep, rules, ci)) for ci, c in enumerate(cands) if not c.is_float]
    remainder: dict[int | None, tuple[float, int]] = {}
    float_report: cost.CostReport | None = None
    for k, (ci, text) in enumerate(probes):
        if progress:
            progress("costs (probe compiles)", k, len(probes))
        rep, _ = work.compile(prep.model_path, Plan.from_text(text, source="<probe>"), prep.target.name,
                              shapes=shapes, want_shapes=ci is None, layers={la.name for la in prep.layers})
        by = rep.by_name()
        fed: dict[str, float] = {}
        for name, owner in work.owners.items():
            if name in by:
                fed[owner] = fed.get(owner, 0.0) + float(by[name].bytes)
        planned = 0.0
        n = 0
        for li, la in enumerate(prep.layers):
            lc = by.get(la.name)
            b = (float(lc.bytes) if lc is not None else 0.0) + fed.get(la.name, 0.0)
            planned += b
            if ci is None:
                la.macs = int(lc.macs) if lc is not None else 0
                for cj, c in enumerate(cands):
                    if c.is_float:
                        tbytes[li, cj] = b
            elif rules[li][ci] is not None:
                tbytes[li, ci] = b
                n += 1
        remainder[ci] = (float(rep.total_bytes) - planned, n)
        if ci is None:
            float_report = rep
    if progress:
        progress("costs (probe compiles)", len(probes), len(probes))
    assert float_report is not None
    base_bytes, _ = remainder[None]
    for ci, cand in enumerate(cands):
        if cand.is_float:
            continue
        rb, n = remainder[ci]
        ok = np.isfinite(tbytes[:, ci])
        tbytes[ok, ci] = np.maximum(tbytes[ok, ci] + (rb - base_bytes) / max(n, 1), 0.0)
    for li, la in enumerate(prep.layers):
        a_bits = cost.spec_bits(la.activation)
        for ci, cand in enumerate(cands):
            if rules[li][ci] is None:
                continue
            spec = prep.specs[li][cand.name]
            w_bits = cost.spec_bits(spec)
            tbits[li, ci] = la.params * w_bits
            tbitops[li, ci] = la.macs * w_bits * (cost.FLOAT_BITS if spec is None else a_bits)
    planned_names = {la.name for la in prep.layers}
    base_ops = float(float_report.bitops) - float(sum(la.macs for la in prep.layers)) * cost.FLOAT_BITS ** 2
    # weights of MAC ops outside the plan count towards the average bits at their stored width
    others = [lc for lc in float_report.layers if lc.params and lc.name not in planned_names]
    other_bits = float(sum(lc.params * (lc.weight_bits or cost.FLOAT_BITS) for lc in others))
    params = float(sum(la.params for la in prep.layers) + sum(lc.params for lc in others))
    src_rep = cost.model_cost(prep.model_path, feed_shapes=shapes, shapes=want_bitops)
    float_totals = {"bytes": float(src_rep.total_bytes), "bitops": float(src_rep.bitops), "params": params}
    base = {"bytes": base_bytes, "bitops": base_ops, "bits": other_bits, "params": params}
    return {"bytes": tbytes, "bitops": tbitops, "bits": tbits}, base, float_totals


def _absolute_budget(b: Budget, float_totals: dict[str, float]) -> float:
    if b.kind == "fraction":
        return float(math.floor(b.value * float_totals["bytes"]))
    if b.kind == "bitops-fraction":
        return b.value * float_totals["bitops"]
    return float(b.value)


def _capacity(unit: str, budget_value: float, base: dict[str, float]) -> float:
    """What the layers' costs may add up to: budget minus the fixed part (average bits: times parameters)."""
    if unit == "bits":
        return budget_value * base["params"] - base["bits"]
    return budget_value - base[unit]


def _cheapest(unit: str, table: dict[str, np.ndarray], base: dict[str, float]) -> float:
    total = float(np.nansum(np.nanmin(table[unit], axis=1)))
    if unit == "bits":
        return (base["bits"] + total) / max(base["params"], 1.0)
    return base[unit] + total


def _groups(values: np.ndarray, costs: np.ndarray) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    groups_c, groups_v, index = [], [], []
    for li in range(values.shape[0]):
        ok = [ci for ci in range(values.shape[1]) if np.isfinite(costs[li, ci]) and np.isfinite(values[li, ci])]
        index.append(ok)
        groups_c.append([float(costs[li, ci]) for ci in ok])
        groups_v.append([float(values[li, ci]) for ci in ok])
    return groups_c, groups_v, index


def _solve(values: np.ndarray, costs: np.ndarray, cap: float, opts: PlanOptions) -> list[int] | None:
    groups_c, groups_v, index = _groups(values, costs)
    if opts.solver == "lagrange":
        sol = knapsack.lagrangian(groups_c, groups_v, cap)
    else:
        sol = knapsack.solve(groups_c, groups_v, cap, resolution=opts.resolution)
    if sol is None:
        return None
    return [index[li][o] for li, o in enumerate(sol.choice)]


def _predict(choice: Sequence[int], table: dict[str, np.ndarray], base: dict[str, float], values: np.ndarray,
             sens: SensitivityResult) -> dict[str, Any]:
    rows, cols = np.arange(len(choice)), np.asarray(choice, dtype=np.int64)
    # gathered with numpy, summed in layer order as before (same floating-point result)
    b = base["bytes"] + sum(table["bytes"][rows, cols].tolist())
    ops = base["bitops"] + sum(x for x in table["bitops"][rows, cols].tolist() if math.isfinite(x))
    bits = (base["bits"] + sum(table["bits"][rows, cols].tolist())) / max(base["params"], 1)
    s = float(sum(values[rows, cols].tolist()))
    return {"bytes": b, "bitops": ops, "avg_bits": bits, "sensitivity": s, "sqnr_db": sens.predicted_sqnr_db(choice)}


def _front_points(values: np.ndarray, table: dict[str, np.ndarray], base: dict[str, float],
                  sens: SensitivityResult, unit: str, opts: PlanOptions) -> list[FrontPoint]:
    """The Pareto-optimal plans of the additive model (none marked chosen), in the knapsack's order."""
    groups_c, groups_v, index = _groups(values, table[unit])
    sols = knapsack.pareto_front(groups_c, groups_v, resolution=min(opts.resolution, 4096))
    points: list[FrontPoint] = []
    seen: set[tuple[int, ...]] = set()
    for s in sols:
        ch = [index[li][o] for li, o in enumerate(s.choice)]
        if tuple(ch) in seen:
            continue
        seen.add(tuple(ch))
        p = _predict(ch, table, base, values, sens)
        points.append(FrontPoint(ch, p["bytes"], p["bitops"], p["avg_bits"], p["sensitivity"], p["sqnr_db"]))
    return points


def _front(values: np.ndarray, table: dict[str, np.ndarray], base: dict[str, float], sens: SensitivityResult,
           unit: str, chosen: Sequence[int], opts: PlanOptions, points: Sequence[FrontPoint] | None = None
           ) -> list[FrontPoint]:
    """The Pareto front sorted by the budget's unit, ``chosen`` marked (added when it is not on it); ``points``:
    the :func:`_front_points` of the same tables, when already computed."""
    raw = _front_points(values, table, base, sens, unit, opts) if points is None else points
    points = [FrontPoint(list(p.choice), p.bytes, p.bitops, p.avg_bits, p.sensitivity, p.predicted_sqnr_db,
                         p.measured_sqnr_db, chosen=list(p.choice) == list(chosen)) for p in raw]
    if chosen and not any(p.chosen for p in points):
        p = _predict(chosen, table, base, values, sens)
        points.append(FrontPoint(list(chosen), p["bytes"], p["bitops"], p["avg_bits"], p["sensitivity"],
                                 p["sqnr_db"], chosen=True))
    points.sort(key=_unit_key(unit))
    return points


def _unit_key(unit: str) -> Callable[[FrontPoint], float]:
    return {"bytes": lambda q: q.bytes, "bitops": lambda q: q.bitops, "bits": lambda q: q.avg_bits}[unit]


def plan_for_compile(model_path: str | Path, copts: Any, base: Plan, progress: Progress | None = None
                     ) -> AutoPlanResult:
    """``qcompiler compile --budget``: the auto plan for a :class:`~qcompiler.api.CompileOptions`."""
    budget = Budget.parse(str(copts.budget), bitops=bool(copts.budget_bitops))
    popts = PlanOptions(budget=budget, candidates=parse_candidates(copts.budget_candidates or DEFAULT_CANDIDATES),
                        default_candidates=not copts.budget_candidates,
                        metric=copts.budget_metric or "pd", target=copts.target, base_plan=base, seed=copts.seed)
    calib = None if copts.calib is None or str(copts.calib) in ("none", "random") else copts.calib
    return auto_plan(model_path, calib, popts, progress=progress)


# -------------------------------------------------------------------------------------------- measuring
def measure_sqnr(model_path: str | Path, plan: Plan, calib: str | Path, *, target: str = "ort",
                 validate_data: str | Path | None = None, calib_samples: int | None = None) -> float:
    """Compile ``plan`` for real (calibration data ``calib``) and return the worst output SQNR in dB, measured in
    onnxruntime on ``validate_data`` (default: the calibration data), graph outputs only."""
    from qcompiler.api import CompileOptions, compile_model
    from qcompiler.report import validate as qv

    tmp = Path(tempfile.mkdtemp(prefix="qcompiler-measure-"))
    try:
        out = tmp / "m.onnx"
        compile_model(model_path, out, CompileOptions(plan=plan, target=target, calib=str(calib),
                                                      calib_samples=calib_samples, validate=False))
        float_model = ir.load_model(model_path)
        feeds = qv.load_feeds(validate_data if validate_data is not None else calib, float_model)
        report = qv.validate(float_model, ir.load_model(out), feeds, per_layer=False)
        return float(report.worst_output_sqnr())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def text_for_choice(result: AutoPlanResult, choice: Sequence[int]) -> str:
    """The result's plan text with each layer's rule switched to ``choice`` (comments unchanged)."""
    swap: dict[str, str] = {}
    for li, (old, new) in enumerate(zip(result.choice, choice)):
        a, b = result.rules[li][old], result.rules[li][new]
        if a is None or b is None:
            raise ValueError(f"layer {result.layers[li].name}: candidate not allowed")
        swap[f"  - {_flow(a)}"] = f"  - {_flow(b)}"
    return "\n".join(swap.get(line, line) for line in result.text.splitlines()) + "\n"


def measure_front(model_path: str | Path, result: AutoPlanResult, calib: str | Path, *, points: int = 5,
                  validate_data: str | Path | None = None, calib_samples: int | None = None,
                  progress: Progress | None = None) -> list[FrontPoint]:
    """Measure the output SQNR of up to ``points`` front points spread over the cost range, plus the chosen
    plan; fills their ``measured_sqnr_db`` and returns them."""
    front = result.front
    if not front or points <= 0:
        return []
    picked = set(np.unique(np.round(np.linspace(0, len(front) - 1, points)).astype(int)).tolist())
    picked |= {i for i, p in enumerate(front) if p.chosen}
    order = sorted(picked)
    for k, i in enumerate(order):
        if progress:
            progress("measure front", k, len(order))
        p = front[i]
        plan = result.plan if p.chosen else Plan.from_text(text_for_choice(result, p.choice), source="<front>")
        p.measured_sqnr_db = measure_sqnr(model_path, plan, calib, target=result.target,
                                          validate_data=validate_data, calib_samples=calib_samples)
    if progress:
        progress("measure front", len(order), len(order))
    return [front[i] for i in order]


# ------------------------------------------------------------------------------------------- writing
def write_plan(result: AutoPlanResult, path: str | Path) -> Path:
    p = Path(path)
    with ir.atomic_output(p) as tmp:
        tmp.write_text(result.text, encoding="utf-8")
    return p


def front_csv(result: AutoPlanResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", "chosen", "bytes", "bitops", "avg_weight_bits", "predicted_sensitivity",
                "predicted_sqnr_db", "measured_sqnr_db", *[f"n_{c}" for c in result.candidates], "plan"])
    for i, p in enumerate(result.front):
        counts = p.counts(result.candidates)
        w.writerow([i, int(p.chosen), round(p.bytes), round(p.bitops), f"{p.avg_bits:.4f}",
                    f"{p.sensitivity:.6g}",
                    "" if p.predicted_sqnr_db is None or not math.isfinite(p.predicted_sqnr_db)
                    else f"{p.predicted_sqnr_db:.3f}",
                    "" if p.measured_sqnr_db is None else f"{p.measured_sqnr_db:.3f}",
                    *[counts[c] for c in result.candidates],
                    " ".join(result.candidates[ci] for ci in p.choice)])
    return buf.getvalue()


def write_front(result: AutoPlanResult, csv_path: str | Path, svg_path: str | Path | None = None) -> list[Path]:
    """Write the Pareto front as CSV and (default: beside it, ``.svg``) as a hand-written SVG plot."""
    out = []
    p = Path(csv_path)
    with ir.atomic_output(p) as tmp:
        tmp.write_text(front_csv(result), encoding="utf-8")
    out.append(p)
    svg = Path(svg_path) if svg_path is not None else p.with_suffix(".svg")
    with ir.atomic_output(svg) as tmp:
        tmp.write_text(front_svg(result), encoding="utf-8")
    out.append(svg)
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    x = start
    while x <= hi + 1e-9 * step:
        ticks.append(round(x, 10))
        x += step
    return ticks


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def front_svg(result: AutoPlanResult) -> str:
    """Predicted and measured output SQNR against the budget's cost, as a standalone SVG (no plotting library)."""
    unit = result.unit
    xs_of = {"bytes": lambda p: p.bytes, "bitops": lambda p: p.bitops, "bits": lambda p: p.avg_bits}[unit]
    pts = result.front
    pred = [(xs_of(p), p.predicted_sqnr_db) for p in pts if p.predicted_sqnr_db is not None
            and math.isfinite(p.predicted_sqnr_db)]
    meas = [(xs_of(p), p.measured_sqnr_db) for p in pts if p.measured_sqnr_db is not None
            and math.isfinite(p.measured_sqnr_db)]
    sens = [(xs_of(p), p.sensitivity) for p in pts]
    use_sens = not pred and not meas
    series = sens if use_sens else pred + meas
    w, h, ml, mr, mt, mb = 720, 440, 80, 30, 50, 60
    xs = [x for x, _ in (series or [(0.0, 0.0)])] + [result.budget_value]
    ys = [y for _, y in (series or [(0.0, 0.0)])]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 <= x0:
        x1 = x0 + 1.0
    if y1 <= y0:
        y1 = y0 + 1.0
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * (w - ml - mr)

    def py(y: float) -> float:
        return h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)

    label_x = {"bytes": "model bytes", "bitops": "BitOps", "bits": "average weight bits"}[unit]
    label_y = "predicted sensitivity (lower is better)" if use_sens else "output SQNR (dB)"
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
          'font-family="sans-serif" font-size="12">',
          f'<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>',
          f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">'
          f'{_esc(Path(result.model).name)}: Pareto front ({_esc(result.sensitivity.metric)}, '
          f'{_esc(", ".join(result.candidates))})</text>',
          f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
          f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>']
    scale, suffix = 1.0, ""
    if unit == "bytes":
        scale, suffix = next(((f, u) for f, u in ((1024.0**2, " MiB"), (1024.0, " KiB")) if x1 >= 4 * f), (1.0, " B"))
    elif unit == "bitops":
        scale, suffix = next(((f, u) for f, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if x1 >= 4 * f),
                             (1.0, ""))
    for t_scaled in _nice_ticks(x0 / scale, x1 / scale):
        tx = t_scaled * scale
        lab = f"{t_scaled:g}{suffix}"
        el.append(f'<line x1="{px(tx):.1f}" y1="{h - mb}" x2="{px(tx):.1f}" y2="{h - mb + 5}" stroke="black"/>')
        el.append(f'<text x="{px(tx):.1f}" y="{h - mb + 18}" text-anchor="middle">{_esc(lab)}</text>')
        el.append(f'<line x1="{px(tx):.1f}" y1="{mt}" x2="{px(tx):.1f}" y2="{h - mb}" stroke="#eee"/>')
    for ty in _nice_ticks(y0, y1):
        el.append(f'<line x1="{ml - 5}" y1="{py(ty):.1f}" x2="{ml}" y2="{py(ty):.1f}" stroke="black"/>')
        el.append(f'<text x="{ml - 8}" y="{py(ty) + 4:.1f}" text-anchor="end">{ty:g}</text>')
        el.append(f'<line x1="{ml}" y1="{py(ty):.1f}" x2="{w - mr}" y2="{py(ty):.1f}" stroke="#eee"/>')
    el.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 15}" text-anchor="middle">{label_x}</text>')
    el.append(f'<text x="18" y="{(mt + h - mb) / 2}" text-anchor="middle" '
              f'transform="rotate(-90 18 {(mt + h - mb) / 2})">{label_y}</text>')
    bx = px(result.budget_value)
    el.append(f'<line x1="{bx:.1f}" y1="{mt}" x2="{bx:.1f}" y2="{h - mb}" stroke="#c33" stroke-dasharray="5,4"/>')
    el.append(f'<text x="{bx + 4:.1f}" y="{mt + 12}" fill="#c33">budget</text>')
    line_pts = sens if use_sens else pred
    if line_pts:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line_pts)
        el.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        for x, y in line_pts:
            el.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="#1f77b4"/>')
    for x, y in meas:
        el.append(f'<rect x="{px(x) - 4:.1f}" y="{py(y) - 4:.1f}" width="8" height="8" fill="#ff7f0e"/>')
    for p in pts:
        if p.chosen:
            yc: float | None = p.sensitivity if use_sens else (
                p.measured_sqnr_db if p.measured_sqnr_db is not None else p.predicted_sqnr_db)
            if yc is not None and math.isfinite(yc):
                el.append(f'<circle cx="{px(xs_of(p)):.1f}" cy="{py(yc):.1f}" r="7" fill="none" stroke="#2ca02c" '
                          'stroke-width="2"/>')
    lx, ly = w - mr - 200, h - mb - 60
    el.append(f'<rect x="{lx}" y="{ly}" width="195" height="56" fill="white" stroke="#999"/>')
    el.append(f'<circle cx="{lx + 12}" cy="{ly + 14}" r="3" fill="#1f77b4"/><text x="{lx + 22}" y="{ly + 18}">'
              f'{"predicted sensitivity" if use_sens else "predicted SQNR"}</text>')
    el.append(f'<rect x="{lx + 8}" y="{ly + 26}" width="8" height="8" fill="#ff7f0e"/><text x="{lx + 22}" '
              f'y="{ly + 34}">measured SQNR</text>')
    el.append(f'<circle cx="{lx + 12}" cy="{ly + 46}" r="6" fill="none" stroke="#2ca02c" stroke-width="2"/>'
              f'<text x="{lx + 22}" y="{ly + 50}">chosen plan</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"
