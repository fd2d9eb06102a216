"""How the core reaches the model format without importing it: export, check and save hooks.

The core (passes, the pass manager, the compile context) works on the graphsurgeon graph only. Turning that
graph into a model file — for ``verify_each`` (checker + strict shape inference after a pass), ``dump_after``
(save the model after a pass) and :meth:`CompileContext.export` — is the IR layer's job. The layer that owns
the model format hands the core a :class:`ModelIO`: per context (``CompileContext.model_io``), per manager
(``PassManager(model_io=...)``), or process-wide with :func:`install` (``qcompiler.passes`` installs the
``qcompiler.ir`` functions when it is imported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelIO:
    """The three model-format operations the core needs (models are opaque objects here)."""

    #: ``(graph, meta) -> model``: the graph as a model, node tags written
    export: Callable[[Any, Any], Any]
    #: ``(model, where) -> None``: checker + strict shape inference; raises ``UserError`` naming ``where``
    check: Callable[[Any, str], None]
    #: ``(model, path) -> None``: write the model (atomically)
    save: Callable[[Any, Path], object]


_INSTALLED: ModelIO | None = None


def install(io: ModelIO) -> None:
    """Make ``io`` the process-wide default (the IR layer does this once)."""
    global _INSTALLED
    _INSTALLED = io


def installed() -> ModelIO:
    """The process-wide :class:`ModelIO`; ``RuntimeError`` when no IR layer installed one."""
    if _INSTALLED is None:
        raise RuntimeError("no model I/O installed: import qcompiler.passes (it installs qcompiler.ir's) or give "
                           "the CompileContext / PassManager a model_io")
    return _INSTALLED
