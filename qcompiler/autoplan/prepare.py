"""The model as ``compile`` resolves plans on it (the target's pipeline up to ``resolve-plan``, through
:func:`qcompiler.session.run_prefix`), the layers to decide with the candidates the target allows on each
(:func:`prepare`), and the calibration feeds the sensitivities are measured on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.autoplan.budget import Candidate
from qcompiler.autoplan.result import LayerInfo
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.core.errors import UserError
from qcompiler.core.registry import get_target
from qcompiler.plan import NodePlan, Plan, QuantSpec, load_plan
from qcompiler.plan.spec import make_spec
from qcompiler.session import run_prefix

log = logging.getLogger("qcompiler.autoplan")


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


#: (base plan, model, unmatched rules) already warned about (the planner prepares one base once per search: 8x)
_WARNED: set[tuple[str, str, tuple[str, ...]]] = set()


def spec_dict(spec: QuantSpec) -> dict[str, Any]:
    return asdict(spec)


def prepare(model_path: str | Path, candidates: Sequence[Candidate], *, target: str = "ort",
            base_plan: str | Path | Plan | None = None, drop_unsupported: bool = False) -> Prepared:
    """The float graph as ``compile`` resolves plans on it, the layers to decide and each one's candidates.

    A candidate the target runs on no layer is an error naming it, or, with ``drop_unsupported`` (the default
    candidate list, which the user did not choose), left out with a warning (listed in ``Prepared.dropped``)."""
    src = Path(model_path)
    tgt = get_target(target)
    base = base_plan if isinstance(base_plan, Plan) else load_plan(base_plan)
    ctx = run_prefix(src, base, tgt)  # the target's pipeline up to resolve-plan: the compile's nodes and names
    meta = ctx.meta
    assert ctx.resolved is not None
    unmatched = set(ctx.resolved.unmatched_rules)
    if unmatched:
        # a preset's rule for op types this model lacks (w4a8's MatMul / Gemm rule on a Conv-only model): it
        # decides nothing here, so the plans written leave it out (and their compiles need not warn again)
        key = (str(base.source), str(src.resolve()), tuple(sorted(unmatched)))
        (log.info if key in _WARNED else log.warning)(
            "plan: base plan %s: %s match(es) no node of %s; left out of the plans written", base.source,
            ", ".join(sorted(unmatched)), src.name)
        _WARNED.add(key)  # once per process: the planner prepares the same base for each of its searches
        base = replace(base, rules=[r for r in base.rules if r.describe() not in unmatched])
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
        base_w = spec_dict(np_.weight)
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
            tries = [merged]
            if merged.get("granularity") == "block" and "granularity" not in cand.keys():
                # an 8-bit candidate on a block-wise base (w4a8's MatMul rule) next to an 8-bit integer
                # activation: no onnxruntime kernel runs it (Target.check_node); then per channel, as int8 means
                # anywhere else ("int8/block32", which asks for blocks, stays refused)
                tries.append({k: v for k, v in merged.items() if k != "block_size"} | {"granularity": "per_channel"})
            error = ""
            for keys in tries:
                try:
                    spec = make_spec(keys, f"candidate {cand.name} for node '{np_.node}'")
                    tgt.check_node(NodePlan(node=np_.node, op_type=np_.op_type, weight=spec,
                                            activation=np_.activation, rules=[f"candidate {cand.name}"],
                                            weight_inputs=np_.weight_inputs,
                                            activation_inputs=np_.activation_inputs))
                except UserError as e:
                    error = str(e)
                    continue
                allowed[cand.name] = spec
                break
            else:
                refused[cand.name] = error
                refused_everywhere.setdefault(cand.name, error)
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


def calib_source(graph: Any, calib: str | Path | None, samples: int, seed: int) -> Any:
    """The calibration data as a (streaming) CalibrationSource; ``None`` / ``random``: ``samples`` seeded
    synthetic samples, with a warning."""
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
