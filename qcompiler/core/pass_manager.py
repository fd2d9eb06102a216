"""Runs a list of passes: checks the pipeline first, then runs, times, verifies and dumps."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompiler.core import profile
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import PassFailure, QCompilerError, UserError
from qcompiler.core.model_io import ModelIO, installed
from qcompiler.core.pass_base import Pass, PassResult, Sequential
from qcompiler.core.registry import registry

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did in a run (a :class:`Sequential`'s children in ``children``, not in the JSON)."""

    name: str
    modified: bool
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)
    children: list[PassRecord] = field(default_factory=list)
    #: not run: its result came with a prepared graph (:mod:`qcompiler.core.prepared`), seconds 0
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "modified": self.modified, "seconds": round(self.seconds, 4),
                "stats": dict(sorted(self.stats.items())), **({"cached": True} if self.cached else {})}


@dataclass
class _Step:
    """One pass to run: its dump-file prefix (``09`` or ``09-lower.02``), its position in errors (``#9``,
    ``#9.2``), the name failures give (``lower/lower-packed`` for a child), the passes that run after it."""

    p: Pass
    label: str
    where: str
    qualified: str
    after: tuple[str, ...]
    children: list[_Step] = field(default_factory=list)


class PassManager:
    """Check then run a pipeline.

    * :meth:`check` walks the pipeline with the set of properties available at the start and fails (before
      anything runs) when a pass requires a property no earlier pass produces, or invalidates one an earlier
      pass established (it must run before that pass); invalidated properties are dropped.
    * a :class:`Sequential` pass (``lower``) runs its children like top-level passes: each is timed, verified
      and dumped; the record of the Sequential merges their statistics.
    * ``verify_each``: after each pass, export and run the ONNX checker + strict shape inference.
    * ``dump_after``: pass names (or ``{"all"}``: every top-level pass) whose result is saved as
      ``NN-name.onnx`` in ``dump_dir`` (a child of a Sequential: ``NN-parent.MM-child.onnx``).
    * ``model_io``: export / check / save of the model (default: the context's, else the installed one).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: bool = False,
        dump_after: set[str] | None = None,
        dump_dir: Path | None = None,
        on_pass: Callable[[str, int, int], None] | None = None,
        model_io: ModelIO | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.dump_after = dump_after or set()
        self.dump_dir = dump_dir
        self.on_pass = on_pass
        self.model_io = model_io
        known = {p.name for p in self.passes} | {c.name for p in self.passes if isinstance(p, Sequential)
                                                for c in p.passes}
        if any(isinstance(p, Sequential) and type(p).children is not Sequential.children for p in self.passes):
            known |= set(_registered_names())  # children chosen at run time (by the target): any pass name
        unknown = self.dump_after - known - {"all"}
        if unknown:
            raise UserError(f"--dump-after: no pass named '{sorted(unknown)[0]}' in the pipeline")

    def pipeline_text(self) -> str:
        return ",".join(p.canonical() for p in self.passes)

    def check(self, available: set[str]) -> None:
        """Refuse an impossible order before anything runs (Sequentials by their declared properties)."""
        _check_order([(f"#{i + 1}", p, True) for i, p in enumerate(self.passes)], available)

    def run(self, ctx: CompileContext, *, served: Sequence[PassRecord] = (),
            after: tuple[int, Callable[[list[PassRecord]], None]] | None = None) -> list[PassRecord]:
        """Run the pipeline on ``ctx``. ``served``: the records of its first passes, whose result ``ctx`` already
        holds (a prepared graph): they are not run, only their properties applied, and come back marked
        ``cached``. ``after=(n, fn)``: ``fn(records)`` once the first ``n`` passes ran."""
        self.check(ctx.properties)
        steps = self._steps(ctx)
        # the children of Sequentials are known now: check the whole order once more with them in place
        _check_order(_flatten(steps), ctx.properties)
        records: list[PassRecord] = []
        for i, step in enumerate(steps):
            if self.on_pass:
                self.on_pass(step.p.name, i, len(steps))
            if i < len(served):
                _apply_properties(step.p, ctx)
                rec = served[i]
                if rec.name != step.p.name:
                    raise ValueError(f"served record '{rec.name}' for pass #{i + 1} '{step.p.name}'")
                records.append(PassRecord(rec.name, rec.modified, 0.0, dict(rec.stats), [], cached=True))
            else:
                records.append(self._run_step(step, ctx, top=True))
            if after is not None and i + 1 == after[0]:
                after[1](records[:i + 1])
        return records

    # ------------------------------------------------------------------------------------------ internals
    def _steps(self, ctx: CompileContext) -> list[_Step]:
        names = [p.name for p in self.passes]
        return [_expand(p, ctx, f"{i + 1:02d}", f"#{i + 1}", p.name, tuple(names[i + 1:]))
                for i, p in enumerate(self.passes)]

    def _run_step(self, step: _Step, ctx: CompileContext, *, top: bool) -> PassRecord:
        with profile.step(f"pass {step.p.name}"):  # the compile's --profile (nothing when none is active)
            return self._run_step_timed(step, ctx, top=top)

    def _run_step_timed(self, step: _Step, ctx: CompileContext, *, top: bool) -> PassRecord:
        p = step.p
        ctx.passes_after = step.after  # what a pass may look ahead at
        t0 = time.perf_counter()
        children: list[PassRecord] = []
        if isinstance(p, Sequential):
            results: list[tuple[Pass, PassResult]] = []
            for child in step.children:
                rec = self._run_step(child, ctx, top=False)
                children.append(rec)
                results.append((child.p, PassResult(rec.modified, Counter(rec.stats))))
            ctx.passes_after = step.after
            result = p.merge(results)
        else:
            try:
                result = p.run(ctx)
            except QCompilerError:
                raise
            except Exception as e:
                raise PassFailure(step.qualified, e) from e
            if not isinstance(result, PassResult):
                raise PassFailure(step.qualified, TypeError(f"run() returned {type(result).__name__}, not PassResult"))
        dt = time.perf_counter() - t0
        own = type(p) if isinstance(p, Sequential) else p  # a Sequential's children applied theirs already
        _apply_properties(own, ctx)
        rec = PassRecord(p.name, bool(result.modified), dt, dict(result.stats), children)
        log.info("pass %-16s %s %.3fs %s", p.name, "modified" if rec.modified else "unchanged", dt,
                 dict(sorted(rec.stats.items())))
        if self.verify_each and not step.children:  # a Sequential's children were verified
            self._verify(ctx, step.qualified)
        wanted = p.name in self.dump_after or (top and "all" in self.dump_after)
        if self.dump_dir is not None and wanted:
            path = self.dump_dir / f"{step.label}-{p.name}.onnx"
            io = self._io(ctx)
            io.save(io.export(ctx.graph, ctx.meta), path)
            log.info("dumped %s", path)
        return rec

    def _io(self, ctx: CompileContext) -> ModelIO:
        return ctx.model_io or self.model_io or installed()

    def _verify(self, ctx: CompileContext, name: str) -> None:
        io = self._io(ctx)
        model = io.export(ctx.graph, ctx.meta)
        try:
            io.check(model, f"after pass '{name}'")
        except UserError as e:
            raise PassFailure(name, RuntimeError(str(e))) from None


def _apply_properties(p: Any, ctx: CompileContext) -> None:
    """What running ``p`` does to ``ctx.properties``: its ``invalidates`` dropped, its ``produces`` added."""
    ctx.properties -= set(p.invalidates)
    ctx.properties |= set(p.produces)


def _expand(p: Pass, ctx: CompileContext, label: str, where: str, qualified: str, after: tuple[str, ...]) -> _Step:
    """The step of ``p`` with, for a Sequential, the steps of its children (recursively)."""
    step = _Step(p, label, where, qualified, after)
    if isinstance(p, Sequential):
        kids = p.children(ctx)
        names = [c.name for c in kids]
        step.children = [_expand(c, ctx, f"{label}-{p.name}.{j + 1:02d}", f"{where}.{j + 1}", f"{qualified}/{c.name}",
                                 (*names[j + 1:], *after)) for j, c in enumerate(kids)]
    return step


def _flatten(steps: list[_Step]) -> list[tuple[str, Pass, bool]]:
    """(position, pass, is it a whole pass?): a Sequential's children, then the Sequential itself for the
    ``produces`` / ``invalidates`` of its class (its requires are its children's, checked with them)."""
    out: list[tuple[str, Pass, bool]] = []
    for s in steps:
        if isinstance(s.p, Sequential):
            out.extend(_flatten(s.children))
            out.append((s.where, s.p, False))
        else:
            out.append((s.where, s.p, True))
    return out


def _check_order(passes: list[tuple[str, Pass, bool]], available: set[str]) -> None:
    have = set(available)
    made_by: dict[str, str] = {}
    for where, q, whole in passes:
        p: Any = q if whole else type(q)
        missing = sorted(set(p.requires) - have) if whole else []
        if missing:
            producers = sorted({c.name for c in _producers_hint(missing[0])})
            hint = f" (run {' or '.join(producers)} before it)" if producers else ""
            raise UserError(f"pipeline: pass {where} '{p.name}' requires '{missing[0]}', "
                            f"which no earlier pass produces{hint}")
        broken = sorted(set(p.invalidates) & have)
        if broken:
            maker = made_by.get(broken[0]) or next(iter(sorted(c.name for c in _producers_hint(broken[0]))),
                                                   broken[0])
            why = f" ({p.invalidates_why})" if p.invalidates_why else ""
            raise UserError(f"pipeline: '{p.name}' must run before '{maker}'{why}")
        have -= set(p.invalidates)
        have |= set(p.produces)
        made_by.update({prop: p.name for prop in p.produces})


def _registered_names() -> list[str]:
    try:
        return list(registry().passes)
    except Exception:  # a broken plugin must not hide the real error
        return []


def _producers_hint(prop: str) -> list[type[Pass]]:
    try:
        return [cls for cls in registry().passes.values() if prop in cls.produces]
    except Exception:  # the hint must never hide the real error
        return []
