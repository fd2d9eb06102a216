"""The pipeline prefix, written once: load a model, upgrade its opset as the plan needs, import it into
graphsurgeon (fp16 models computed in fp32), build the :class:`CompileContext` and run passes over it.

``compile`` runs the whole pipeline this way (:mod:`qcompiler.compile`); ``qcompiler plan resolve`` and the
auto planner's preparation (:func:`run_prefix`) run the target's pipeline up to and including ``resolve-plan``,
so that they see the nodes (and node names) the compile will see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompiler import ir
from qcompiler.core import profile
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import Registry, build_pipeline, parse_pipeline_text
from qcompiler.plan import Plan, QuantSpec, required_opset
from qcompiler.plan.spec import make_spec

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from qcompiler.core.pass_base import Pass
    from qcompiler.core.registry import Target  # the type, as the registry hands targets out
    from qcompiler.ir.api_support import ModelProto

#: where the prefix ends when none is named: the plan is resolved, nothing is calibrated or quantized yet
RESOLVE = "resolve-plan"


def plan_specs(plan: Plan) -> list[QuantSpec]:
    """Every quantized spec the plan can give a node (defaults and rules, merged as resolution merges them)."""
    specs = [make_spec(plan.weight_defaults, "defaults.weight"), make_spec(plan.activation_defaults,
                                                                             "defaults.activation")]
    for r in plan.rules:
        if r.skip:
            continue
        specs.append(make_spec({**plan.weight_defaults, **r.weight}, r.describe()))
        specs.append(make_spec({**plan.activation_defaults, **r.activation}, r.describe()))
    return [s for s in specs if not s.is_float]


def prefix_passes(target: Target, until: str = RESOLVE, reg: Registry | None = None) -> list[Pass]:
    """The target's default pipeline up to and including ``until`` (``cleanup,resolve-plan`` when the target's
    pipeline lacks it)."""
    names = [name for name, _ in parse_pipeline_text(target.default_pipeline)]
    if until not in names:
        return build_pipeline(f"cleanup,{until}", reg)
    return build_pipeline(target.default_pipeline, reg)[: names.index(until) + 1]


@dataclass
class Session:
    """One model on its way into a pipeline: the float model as loaded (never modified), and once
    :meth:`import_graph` ran, its graph (computed in fp32) with the metadata export restores."""

    src: Path
    plan: Plan
    target: Target
    model: ModelProto  # the input model as loaded
    graph: gs.Graph | None = None
    meta: ir.ModelMeta | None = None
    #: the original fp16 interface (name -> dtype) that ``ir.restore_io_dtypes`` gives back after the passes
    io_dtypes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, model_path: str | Path, plan: Plan, target: Target) -> Session:
        src = Path(model_path)
        return cls(src=src, plan=plan, target=target, model=ir.load_model(src))

    def import_graph(self, *, upgrade: bool = False, check: bool = False) -> gs.Graph:
        """Import the model into graphsurgeon, computed in fp32.

        ``upgrade``: first upgrade the opset (in memory) to what the plan's specs need. ``check``: refuse a plan
        the target cannot run before any rewrite (node names are those of the input model). The upgrade comes
        first so that the graph is imported once: the converter keeps every node and its name (it only adds a
        few helper nodes, float), so the check sees the input model's nodes. When the upgrade fails, a plan
        the target refuses is still reported first."""
        model = self.model
        if upgrade:
            need, why = required_opset(plan_specs(self.plan))
            if ir.opset_of(model) < need:
                try:
                    with profile.step("opset upgrade"):
                        model = ir.upgrade_opset(model, need, why)
                except UserError:
                    if check:
                        graph, _ = ir.import_graph(model, str(self.src))
                        self.target.check(self.plan.resolve(graph, warn=False))
                    raise
        with profile.step("to graphsurgeon"):
            graph, meta = ir.import_graph(model, str(self.src))
        if check:
            with profile.step("plan check"):
                self.target.check(self.plan.resolve(graph, warn=False))  # resolve-plan warns once, later
        with profile.step("to float32"):
            self.io_dtypes = ir.to_float32(graph)
        meta.io_dtypes = self.io_dtypes
        self.graph, self.meta = graph, meta
        return graph

    def context(self, **kw: Any) -> CompileContext:
        """A :class:`CompileContext` over the imported graph (``kw``: the other fields)."""
        assert self.graph is not None and self.meta is not None, "import_graph() first"
        return CompileContext(graph=self.graph, meta=self.meta, plan=self.plan, target=self.target, **kw)


def run_prefix(model_path: str | Path, plan: Plan, target: Target, until: str = RESOLVE) -> CompileContext:
    """Load ``model_path``, import it and run ``target``'s pipeline up to and including ``until`` on it: the
    context as the compile has it at that point (``plan resolve``; the auto planner's layers)."""
    session = Session.load(model_path, plan, target)
    session.import_graph()
    ctx = session.context()
    PassManager(prefix_passes(target, until)).run(ctx)
    return ctx


def keeps_float_function(passes: Sequence[Pass], until: str) -> bool:
    """Whether every pass before the one named ``until`` in ``passes`` keeps the float function (declares
    ``keeps_function``: the graph ``until`` runs computes the float model's outputs, up to float rounding, so the
    compile's validation may take calibration's float outputs as its reference); False when ``until`` is not in
    the pipeline."""
    names = [p.name for p in passes]
    return until in names and all(p.keeps_function for p in passes[:names.index(until)])
