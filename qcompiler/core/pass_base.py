"""The :class:`Pass` base class, its options and its result; :class:`GraphPass` and :class:`Sequential`.

A pass is one rewrite (or analysis) of a :class:`~qcompiler.core.context.CompileContext`. It has

* a kebab-case ``name`` (the CLI / pipeline name; module ``passes/fold_batchnorm.py`` holds
  ``FoldBatchNormPass`` named ``fold-batchnorm``),
* an ``Options`` dataclass whose fields are the ``{key=value}`` options of the textual pipeline,
* ``requires`` / ``produces`` / ``invalidates``: sets of *properties* (strings such as ``"plan-resolved"``) the
  :class:`~qcompiler.core.pass_manager.PassManager` checks before running anything: a pass needs what it
  requires established by an earlier pass, establishes what it produces, and breaks what it invalidates (a
  pass that invalidates a property an earlier pass established is out of order: it must run before that pass),
* ``keeps_function``: True when the pass keeps the graph's float function (for any input the outputs are the
  same up to float rounding: folding, fusing, clean-up, deciding the plan); calibration's float runs after such
  passes only may stand in for validation's float reference (:func:`qcompiler.session.keeps_float_function`),
* ``run(ctx) -> PassResult``: whether the graph changed and a statistics counter. Everything a run computes
  lives in locals (or a small per-run object), never on ``self``: a pass instance may run many times.

A :class:`GraphPass` needs nothing but the graph (``run_graph(graph)``, usable without a context). A
:class:`Sequential` is a pass made of passes: the manager runs its children like top-level passes (timed,
verified, dumped) and reports them as one.

Nodes a pass creates are tagged with :meth:`Pass.tag` so the exported model says who made them.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from qcompiler.core import tags
from qcompiler.core.config import parse_text, parse_text_options, settings_of
from qcompiler.core.errors import UserError

if TYPE_CHECKING:
    from qcompiler.core.context import CompileContext


@dataclass
class NoOptions:
    """A pass without options."""


@dataclass
class PassResult:
    """What a pass reports: did it change the graph, and counts of what it did or refused."""

    modified: bool = False
    stats: Counter[str] = field(default_factory=Counter)


def _coerce(value: str, annotation: Any, where: str) -> Any:
    """Turn the text of a pipeline option into the dataclass field's type (:func:`qcompiler.core.config.parse_text`)."""
    return parse_text(value, annotation, where)


class Pass:
    """Base class of every pass. Subclass it, set ``name``, optionally ``Options``, and implement ``run``."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: properties an earlier pass must have established
    requires: frozenset[str] = frozenset()
    #: properties this pass establishes
    produces: frozenset[str] = frozenset()
    #: properties this pass breaks (e.g. changing weights after calibration breaks ``calibrated``): the
    #: manager refuses the pipeline when one of them is established when the pass would run, and drops them
    invalidates: frozenset[str] = frozenset()
    #: why the order matters, shown in that error: ``'smooth' must run before 'calibrate' (<why>)``
    invalidates_why: ClassVar[str] = ""
    #: True when the pass keeps the graph's float function (outputs equal up to float rounding for any input):
    #: calibration after only such passes runs the float model (tests/test_pass_contract.py checks every claim)
    keeps_function: bool = False
    #: True when the pass reads nothing but the graph and its own options, and writes nothing but the graph and
    #: the context's ``properties`` / ``bn_stats`` (:mod:`qcompiler.core.prepared`: a measured compile's leading
    #: graph-only passes run once per model, the later compiles start from a copy of their result)
    graph_only: ClassVar[bool] = False
    #: True when a second run right after the first changes nothing (tests/test_pass_contract.py checks every
    #: built-in that claims it); False for passes that would do their work again
    idempotent: ClassVar[bool] = True

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an options object or keyword options")
        try:
            self.options = options if options is not None else self.Options(**kwargs)
        except TypeError as e:
            raise UserError(f"pass '{self.name}': bad options: {e}") from None

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def from_text_options(cls, text_options: dict[str, str]) -> Pass:
        """Build from ``{key: "text value"}`` as parsed from a pipeline string."""
        kwargs = parse_text_options(text_options, settings_of(cls.Options), f"pass '{cls.name}'")
        inst = cls(**kwargs)
        validate = getattr(inst.options, "validate", None)
        if callable(validate):
            validate(cls.name)
        return inst

    @classmethod
    def summary(cls) -> str:
        """One-line description (first line of the class docstring, else the module's)."""
        doc = inspect.getdoc(cls) if cls.__doc__ else None
        if not doc:
            mod = sys.modules.get(cls.__module__)
            doc = (mod.__doc__ or "") if mod else ""
        return doc.strip().splitlines()[0] if doc and doc.strip() else ""

    def canonical(self) -> str:
        """The pass as pipeline text with its non-default options: ``calibrate{method=percentile}``."""
        if not dataclasses.is_dataclass(self.options):
            return self.name
        default = self.Options()
        parts = []
        for f in dataclasses.fields(self.options):
            v = getattr(self.options, f.name)
            if v != getattr(default, f.name):
                if isinstance(v, tuple):
                    v = ";".join(str(x) for x in v)
                if isinstance(v, bool):
                    v = str(v).lower()
                parts.append(f"{f.name.replace('_', '-')}={v}")
        return f"{self.name}{{{','.join(parts)}}}" if parts else self.name

    # ------------------------------------------------------------------------------------------ running
    def run(self, ctx: CompileContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run")

    def tag(self, node: gs.Node) -> gs.Node:
        """Mark ``node`` as created by this pass (``qcompiler.pass`` node metadata in the output)."""
        tagged: gs.Node = tags.tag(node, self.name)
        return tagged

    def mark_rescaled(self, *tensors: gs.Tensor) -> None:
        """Mark ``tensors`` as holding, under their input-model names, other values by design of this pass
        (written as ``qcompiler.rescaled`` metadata on their producers: per-layer validation does not compare them
        with the float model's tensors of the same names)."""
        for t in tensors:
            tags.mark_rescaled(t, self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.canonical()}>"


class GraphPass(Pass):
    """A pass that needs the graph only: implement ``run_graph(graph)``.

    It runs without a :class:`~qcompiler.core.context.CompileContext` (tests and tools call ``run_graph``
    directly); the pass manager runs it like any pass (``run(ctx)`` calls ``run_graph(ctx.graph)``).
    """

    def run_graph(self, graph: gs.Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.run_graph")

    def run(self, ctx: CompileContext) -> PassResult:
        return self.run_graph(ctx.graph)


class Sequential(Pass):
    """A pass made of passes, run in order.

    The children are :meth:`children` (the ``passes`` given to the constructor; a subclass may choose them
    from the context, e.g. ``lower`` asks the target). The pass manager runs each child like a top-level pass
    (timed, verified with ``verify_each``, dumped when ``dump_after`` names it) and records the Sequential as
    one pass whose statistics are the children's, keyed ``"<child>.<stat>"``. ``requires`` / ``produces`` /
    ``invalidates`` of a Sequential built from passes are the union of its children's (and its own; a
    requirement an earlier child produces is not required from outside); it keeps the function when every child
    does (or its class says so).
    """

    def __init__(self, passes: Sequence[Pass] = (), options: Any = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.passes = list(passes)
        made: set[str] = set()
        for p in self.passes:
            self.requires = self.requires | (p.requires - made)  # what a later child needs from an earlier one
            made |= p.produces                                   # is not required from outside
            self.produces = self.produces | p.produces
            self.invalidates = self.invalidates | p.invalidates
        self.keeps_function = self.keeps_function or (bool(self.passes) and
                                                      all(p.keeps_function for p in self.passes))

    def children(self, ctx: CompileContext) -> list[Pass]:
        """The passes to run, in order (default: the ones given to the constructor)."""
        return list(self.passes)

    @staticmethod
    def merge(results: Sequence[tuple[Pass, PassResult]]) -> PassResult:
        """One result for the children's: modified if any child modified, stats keyed ``"<child>.<stat>"``."""
        stats: Counter[str] = Counter()
        modified = False
        for p, r in results:
            modified |= bool(r.modified)
            for k, v in r.stats.items():
                stats[f"{p.name}.{k}"] += v
        return PassResult(modified=modified, stats=stats)

    def run(self, ctx: CompileContext) -> PassResult:
        """Run the children directly (no timing, verification or dumps: the pass manager does those)."""
        results: list[tuple[Pass, PassResult]] = []
        for p in self.children(ctx):
            results.append((p, p.run(ctx)))
            ctx.properties -= set(p.invalidates)
            ctx.properties |= set(p.produces)
        return self.merge(results)
