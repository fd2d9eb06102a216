"""The prepared graph: a pipeline's leading graph-only passes done once per model in a measured compile.

The measured default, the presets' algorithm guard and ``--budget``'s planner compile one model several times in
one process: each candidate (or probe), the confirmation, then the final compile. Every one of those compiles
starts the same way — load the file, import it into graphsurgeon (its opset upgraded as the plan needs), then the
target pipeline's leading passes that read nothing but the graph and their own options
(:attr:`~qcompiler.core.pass_base.Pass.graph_only`: ``cleanup``, ``fold-batchnorm``, ``fold-scale``, ``fold-bias``,
``fuse-activations``, ``cleanup``) — and ends in the same graph.

While :func:`sharing` is active and a compile declared the reuse (:func:`expect_reuse`), the first compile of a
file at an opset keeps it as imported (:class:`Imported`: what the plan check reads, and where a compile whose
prefix differs — ``fold-bias`` on or off — starts), and the first one with a given prefix keeps a :class:`Prepared`
(a copy of the graph after those passes, the model metadata, the context fields the passes set, their pass
records); the later ones start from a fresh copy instead of importing (and running those passes) again
(``--profile``: ``prepared graph (cached)`` / ``imported graph (cached)`` under ``import graph``; the pass table:
``cached``). Every copy is a deep one (constants' arrays, shapes, attribute values, the import domains, the
qcompiler marks; graphsurgeon's own copy shares the domain list and pins each constant's export dtype to its dtype
of the moment, which an fp16 model's conversion then contradicts), so what a compile does to its graph never
reaches the kept one: the same files, byte for byte (tests/test_prepared.py).

Key (:attr:`qcompiler.session.Session.prepared_key`): the model file's path and content digest, the opset it is
imported at, the passes' canonical text. Models with external data, graphs with subgraphs and prefixes that changed
any context field besides :data:`KEPT_FIELDS` are not kept. Cap ``$QCOMPILER_PREPARED_CACHE_MB`` (default 64;
0 turns it off); everything is dropped when the outermost :func:`sharing` ends (the top-level compile).
"""

from __future__ import annotations

import contextvars
import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.activations import mib_from_env
from qcompiler.core.pass_base import Pass, Sequential
from qcompiler.core.tags import RESCALED_ATTR, TAG_ATTR

log = logging.getLogger(__name__)

#: environment variable: the cap in MiB of the graphs kept (0: nothing kept)
CACHE_ENV = "QCOMPILER_PREPARED_CACHE_MB"
DEFAULT_MAX_MB = 64  # a model above it (the 97 MB ViT) keeps nothing: +0.4 GB peak RSS for 0.4 s there
#: context fields a prepared prefix may set (restored on a hit); ``passes_after`` is the manager's own
KEPT_FIELDS = ("properties", "bn_stats")
_IGNORED_FIELDS = frozenset({"graph", "passes_after", *KEPT_FIELDS})
_MARKS = (TAG_ATTR, RESCALED_ATTR)


@dataclass
class Imported:
    """A model file as imported into graphsurgeon at one opset (before its fp16 tensors are made fp32)."""

    graph: gs.Graph
    meta: Any  # qcompiler.ir.ModelMeta
    nbytes: int = 0


@dataclass
class Prepared:
    """What a compile's prefix made, kept for the next compile of the same model."""

    raw: Imported  # the graph as imported (the plan check reads it)
    graph: gs.Graph  # the graph after the prefix passes
    meta: Any  # the model metadata export restores (qcompiler.ir.ModelMeta, with the fp16 interface)
    fields: dict[str, Any]  # KEPT_FIELDS of the context after the prefix
    records: list[Any]  # the prefix passes' PassRecords
    nbytes: int = 0


@dataclass
class _Sharing:
    max_bytes: int
    reuse: bool = False
    entries: dict[tuple[Any, ...], Prepared] = field(default_factory=dict)
    imported: dict[tuple[Any, ...], Imported] = field(default_factory=dict)
    nbytes: int = 0
    hits: int = 0
    stored: int = 0


_STATE: contextvars.ContextVar[_Sharing | None] = contextvars.ContextVar("qcompiler_prepared", default=None)


@contextmanager
def sharing() -> Iterator[None]:
    """Compiles inside the block (nested ones: a recipe's candidates) may share prepared graphs once one of them
    calls :func:`expect_reuse`; the outermost block drops them when it ends."""
    if _STATE.get() is not None:
        yield
        return
    token = _STATE.set(_Sharing(mib_from_env(CACHE_ENV, DEFAULT_MAX_MB)))
    try:
        yield
    finally:
        st = _STATE.get()
        _STATE.reset(token)
        if st is not None:
            if st.stored:
                log.debug("prepared graph: %d kept, %d served", st.stored, st.hits)
            st.entries.clear()
            st.imported.clear()


def expect_reuse() -> None:
    """Declare that this model is compiled again inside the active :func:`sharing` block (the measured default,
    the guard): from now on prepared graphs are kept and served there."""
    st = _STATE.get()
    if st is not None:
        st.reuse = True


def active() -> bool:
    """Whether a prepared graph may be kept or served now."""
    st = _STATE.get()
    return st is not None and st.reuse and st.max_bytes > 0


def lookup(key: tuple[Any, ...] | None) -> Prepared | None:
    """The prepared graph kept under ``key`` (file, opset, passes), if any."""
    st = _STATE.get()
    if key is None or st is None or not active():
        return None
    got = st.entries.get(key)
    if got is not None:
        st.hits += 1
    return got


def lookup_imported(key: tuple[Any, ...] | None) -> Imported | None:
    """The imported graph kept under ``key`` (file, opset), if any."""
    st = _STATE.get()
    if key is None or st is None or not active():
        return None
    return st.imported.get(key)


def store(key: tuple[Any, ...] | None, value: Prepared | Imported) -> bool:
    """Keep ``value`` (already a private copy) under ``key`` when it fits the cap."""
    st = _STATE.get()
    if key is None or st is None or not active():
        return False
    if st.nbytes + value.nbytes > st.max_bytes:
        log.debug("prepared graph: %d bytes beyond the %d-byte cap; not kept", value.nbytes, st.max_bytes)
        return False
    if isinstance(value, Imported):
        st.imported[key] = value
    else:
        st.entries[key] = value
    st.nbytes += value.nbytes
    st.stored += 1
    return True


def prefix_length(passes: Sequence[Pass]) -> int:
    """How many of the leading ``passes`` read nothing but the graph and their options (``graph_only``)."""
    n = 0
    for p in passes:
        if isinstance(p, Sequential) or not getattr(p, "graph_only", False):
            break
        n += 1
    return n


# ------------------------------------------------------------------------------------------ context fields
def context_state(ctx: Any) -> dict[str, Any]:
    """A shallow record of the context's fields but the graph and :data:`KEPT_FIELDS` (containers copied), for
    :func:`changed_fields`."""
    out: dict[str, Any] = {}
    for f in fields(ctx):
        if f.name in _IGNORED_FIELDS:
            continue
        v = getattr(ctx, f.name)
        out[f.name] = (v, copy.copy(v) if isinstance(v, (dict, set, list)) else None)
    return out


def changed_fields(before: dict[str, Any], ctx: Any) -> set[str]:
    """The fields of ``ctx`` that are not what :func:`context_state` recorded (another object, or a container
    whose contents changed)."""
    changed = set()
    for name, (obj, contents) in before.items():
        now = getattr(ctx, name)
        if now is not obj or (contents is not None and now != contents):
            changed.add(name)
    return changed


def kept_fields(ctx: Any) -> dict[str, Any]:
    return {name: copy.deepcopy(getattr(ctx, name)) for name in KEPT_FIELDS}


def restore_fields(ctx: Any, kept: dict[str, Any]) -> None:
    for name, value in kept.items():
        setattr(ctx, name, copy.deepcopy(value))


# ------------------------------------------------------------------------------------------ graph copies
def has_subgraphs(graph: gs.Graph) -> bool:
    return any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values())


def copy_graph(graph: gs.Graph) -> gs.Graph:
    """A copy of ``graph`` that shares nothing a pass may change in place: new nodes and tensors (graphsurgeon's
    copy), and copies of constant arrays, shapes, attribute values and the qcompiler marks on nodes and tensors.
    Lazily loaded constants (a view of the loaded model's bytes) are shared: they are read, never written. Not for
    graphs with subgraphs (:func:`has_subgraphs`)."""
    new = graph.copy()
    new.import_domains = copy.deepcopy(graph.import_domains)  # graphsurgeon's copy shares the list
    new.functions = [f.copy() for f in graph.functions]
    old_tensors = graph.tensors()
    for name, t in new.tensors().items():
        src = old_tensors.get(name)
        if src is None:
            continue
        if isinstance(t, gs.Constant):
            _own_values(t, src)
        elif isinstance(t, gs.Variable) and isinstance(t.shape, list):
            t.shape = list(t.shape)
        _copy_marks(src, t)
    for a, b in zip(graph.nodes, new.nodes, strict=True):
        b.attrs = type(b.attrs)((k, _copy_attr(v)) for k, v in b.attrs.items())
        _copy_marks(a, b)
    return new


def constant_bytes(graph: gs.Graph) -> int:
    """Bytes of the in-memory constant arrays of ``graph`` (lazily loaded ones are counted with the model)."""
    return sum(int(t._values.nbytes) for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray))


def _copy_attr(v: Any) -> Any:
    if isinstance(v, gs.Constant):
        c = v.copy()
        _own_values(c, v)
        return c
    if isinstance(v, (list, dict, np.ndarray)):
        return copy.deepcopy(v)
    return v


def _own_values(c: gs.Constant, src: gs.Constant) -> None:
    """Make graphsurgeon's copy ``c`` of constant ``src`` hold its own array (a lazily loaded one stays shared:
    it is only read) and ``src``'s export dtype (graphsurgeon's copy pins it to the dtype of the moment, which an
    fp16 model's conversion to fp32 then contradicts)."""
    if isinstance(c._values, np.ndarray):
        c._values = c._values.copy()
    c._export_dtype = src._export_dtype


def _copy_marks(src: Any, dst: Any) -> None:
    for attr in _MARKS:
        mark = getattr(src, attr, None)
        if mark is not None:
            setattr(dst, attr, mark)
