"""The pipeline prefix, written once: load a model, upgrade its opset as the plan needs, import it into
graphsurgeon (fp16 models computed in fp32), build the :class:`CompileContext` and run passes over it.

``compile`` runs the whole pipeline this way (:mod:`qcompiler.compile`); ``qcompiler plan resolve`` and the
auto planner's preparation (:func:`run_prefix`) run the target's pipeline up to and including ``resolve-plan``,
so that they see the nodes (and node names) the compile will see.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcompiler import ir
from qcompiler.core import prepared, profile
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager, PassRecord
from qcompiler.core.registry import Registry, build_pipeline, parse_pipeline_text
from qcompiler.plan import Plan, QuantSpec, required_opset
from qcompiler.plan.spec import make_spec

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from qcompiler.core.pass_base import Pass
    from qcompiler.core.registry import Target  # the type, as the registry hands targets out
    from qcompiler.ir.api_support import ModelProto

log = logging.getLogger(__name__)

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
    #: the file's identity (path, content digest; ``None`` with external data): the prepared graph's key
    file_key: tuple[str, bytes] | None = None
    #: the leading graph-only passes of the pipeline (:mod:`qcompiler.core.prepared`), their key, and what
    #: :meth:`import_graph` found kept for them or imported to keep
    prepare: list[Pass] = field(default_factory=list)
    prepared_key: tuple[Any, ...] | None = None
    served: prepared.Prepared | None = None
    raw: prepared.Imported | None = None

    @classmethod
    def load(cls, model_path: str | Path, plan: Plan, target: Target) -> Session:
        src = Path(model_path)
        model, key = ir.load_model_keyed(src)
        return cls(src=src, plan=plan, target=target, model=model, file_key=key)

    def import_graph(self, *, upgrade: bool = False, check: bool = False,
                     prepare: Sequence[Pass] = ()) -> gs.Graph:
        """Import the model into graphsurgeon, computed in fp32.

        ``upgrade``: first upgrade the opset (in memory) to what the plan's specs need. ``check``: refuse a plan
        the target cannot run before any rewrite (node names are those of the input model). The upgrade comes
        first so that the graph is imported once: the converter keeps every node and its name (it only adds a
        few helper nodes, float), so the check sees the input model's nodes. When the upgrade fails, a plan
        the target refuses is still reported first.

        ``prepare``: the pipeline's leading graph-only passes (:func:`~qcompiler.core.prepared.prefix_length`).
        In a measured compile (:func:`~qcompiler.core.prepared.active`) the graph an earlier compile of this file
        at this opset kept after the same passes is served (a copy; the check reads the graph as imported), and
        :meth:`run_passes` skips them; else the graph it kept as imported, if any, is the start."""
        model = self.model
        need, why = required_opset(plan_specs(self.plan)) if upgrade else (0, "")
        raw_key = (*self.file_key, max(need, ir.opset_of(model))) \
            if prepared.active() and self.file_key is not None else None
        self.prepare = list(prepare) if raw_key is not None else []
        self.prepared_key = (*raw_key, tuple(p.canonical() for p in self.prepare)) \
            if raw_key is not None and self.prepare else None
        self.served = prepared.lookup(self.prepared_key)
        if self.served is not None:
            hit = self.served
            with profile.step("prepared graph (cached)"):
                if check:
                    self.target.check(self.plan.resolve(hit.raw.graph, warn=False))
                self.graph = prepared.copy_graph(hit.graph)
                self.meta = copy.deepcopy(hit.meta)
                self.io_dtypes = self.meta.io_dtypes
            return self.graph
        self.raw = prepared.lookup_imported(raw_key)
        if self.raw is not None:
            with profile.step("imported graph (cached)"):
                graph, meta = prepared.copy_graph(self.raw.graph), copy.deepcopy(self.raw.meta)
            return self._imported(graph, meta, check)
        if upgrade and ir.opset_of(model) < need:
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
        if raw_key is not None and not prepared.has_subgraphs(graph):  # the later compiles start from a copy
            kept = prepared.Imported(prepared.copy_graph(graph), copy.deepcopy(meta))
            kept.nbytes = prepared.constant_bytes(kept.graph) + self.src.stat().st_size
            if prepared.store(raw_key, kept):
                self.raw = kept
        return self._imported(graph, meta, check)

    def _imported(self, graph: gs.Graph, meta: ir.ModelMeta, check: bool) -> gs.Graph:
        if check:
            with profile.step("plan check"):
                self.target.check(self.plan.resolve(graph, warn=False))  # resolve-plan warns once, later
        with profile.step("to float32"):
            self.io_dtypes = ir.to_float32(graph)
        meta.io_dtypes = self.io_dtypes
        self.graph, self.meta = graph, meta
        return graph

    def run_passes(self, pm: PassManager, ctx: CompileContext) -> list[PassRecord]:
        """``pm.run(ctx)``: its first passes served when :meth:`import_graph` served their graph, else their
        result kept for the next compile of this model when it may be (see :mod:`qcompiler.core.prepared`)."""
        if self.served is not None:
            prepared.restore_fields(ctx, self.served.fields)
            return pm.run(ctx, served=self.served.records)
        raw, key = self.raw, self.prepared_key
        self.raw = None
        if raw is None or key is None:
            return pm.run(ctx)
        before = prepared.context_state(ctx)

        def keep(records: list[PassRecord]) -> None:
            changed = prepared.changed_fields(before, ctx)
            if changed or prepared.has_subgraphs(ctx.graph):
                log.debug("prepared graph not kept: the passes changed %s", sorted(changed) or "subgraphs")
                return
            graph = prepared.copy_graph(ctx.graph)
            prepared.store(key, prepared.Prepared(
                raw=raw, graph=graph, meta=copy.deepcopy(self.meta), fields=prepared.kept_fields(ctx),
                records=records, nbytes=prepared.constant_bytes(graph)))

        return pm.run(ctx, after=(len(self.prepare), keep))

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
