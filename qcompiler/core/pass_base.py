"""The :class:`Pass` base class, its options and its result.

A pass is one rewrite (or analysis) of a :class:`~qcompiler.core.context.CompileContext`. It has

* a kebab-case ``name`` (the CLI / pipeline name; module ``passes/fold_batchnorm.py`` holds
  ``FoldBatchNormPass`` named ``fold-batchnorm``),
* an ``Options`` dataclass whose fields are the ``{key=value}`` options of the textual pipeline,
* ``requires`` / ``produces``: sets of *properties* (strings such as ``"plan-resolved"``) the
  :class:`~qcompiler.core.pass_manager.PassManager` checks before running anything,
* ``run(ctx) -> PassResult``: whether the graph changed and a statistics counter.

Nodes a pass creates are tagged with :meth:`Pass.tag` so the exported model says who made them.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_graphsurgeon as gs

from qcompiler import ir
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
    requires: ClassVar[frozenset[str]] = frozenset()
    produces: ClassVar[frozenset[str]] = frozenset()
    #: True when a second run right after the first must change nothing (tested for built-ins).
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
        return ir.tag(node, self.name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.canonical()}>"
