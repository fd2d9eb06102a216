"""Runs a list of passes: checks the pipeline first, then runs, times, verifies and dumps."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompiler import ir
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import PassFailure, QCompilerError, UserError
from qcompiler.core.pass_base import Pass, PassResult

log = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did in a run."""

    name: str
    modified: bool
    seconds: float
    stats: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "modified": self.modified, "seconds": round(self.seconds, 4),
                "stats": dict(sorted(self.stats.items()))}


class PassManager:
    """Check then run a pipeline.

    * :meth:`check` walks the pipeline with the set of properties available at the start and fails (before
      anything runs) when a pass requires a property no earlier pass produces.
    * ``verify_each``: after each pass, export and run the ONNX checker + strict shape inference.
    * ``dump_after``: pass names (or ``{"all"}``) whose result is saved as ``NN-name.onnx`` in ``dump_dir``.
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        verify_each: bool = False,
        dump_after: set[str] | None = None,
        dump_dir: Path | None = None,
        on_pass: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.passes = list(passes)
        self.verify_each = verify_each
        self.dump_after = dump_after or set()
        self.dump_dir = dump_dir
        self.on_pass = on_pass
        unknown = self.dump_after - {p.name for p in self.passes} - {"all"}
        if unknown:
            raise UserError(f"--dump-after: no pass named '{sorted(unknown)[0]}' in the pipeline")

    def pipeline_text(self) -> str:
        return ",".join(p.canonical() for p in self.passes)

    def check(self, available: set[str]) -> None:
        have = set(available)
        for i, p in enumerate(self.passes):
            missing = sorted(set(p.requires) - have)
            if missing:
                producers = sorted({q.name for q in _producers_hint(missing[0])})
                hint = f" (run {' or '.join(producers)} before it)" if producers else ""
                raise UserError(f"pipeline: pass #{i + 1} '{p.name}' requires '{missing[0]}', "
                                f"which no earlier pass produces{hint}")
            have |= set(p.produces)

    def run(self, ctx: CompileContext) -> list[PassRecord]:
        self.check(ctx.properties)
        records: list[PassRecord] = []
        for i, p in enumerate(self.passes):
            if self.on_pass:
                self.on_pass(p.name, i, len(self.passes))
            ctx.options["passes_after"] = tuple(q.name for q in self.passes[i + 1:])  # what a pass may look ahead at
            t0 = time.perf_counter()
            try:
                result = p.run(ctx)
            except QCompilerError:
                raise
            except Exception as e:
                raise PassFailure(p.name, e) from e
            if not isinstance(result, PassResult):
                raise PassFailure(p.name, TypeError(f"run() returned {type(result).__name__}, not PassResult"))
            dt = time.perf_counter() - t0
            ctx.properties |= set(p.produces)
            rec = PassRecord(p.name, bool(result.modified), dt, dict(result.stats))
            records.append(rec)
            log.info("pass %-16s %s %.3fs %s", p.name, "modified" if rec.modified else "unchanged", dt,
                     dict(sorted(rec.stats.items())))
            if self.verify_each:
                self._verify(ctx, p.name)
            if self.dump_dir is not None and ("all" in self.dump_after or p.name in self.dump_after):
                path = self.dump_dir / f"{i + 1:02d}-{p.name}.onnx"
                ir.save_model(ctx.export(), path)
                log.info("dumped %s", path)
        return records

    @staticmethod
    def _verify(ctx: CompileContext, name: str) -> None:
        model = ctx.export()
        try:
            ir.check_model(model, where=f"after pass '{name}'", full=True)
        except UserError as e:
            raise PassFailure(name, RuntimeError(str(e))) from None


def _producers_hint(prop: str) -> list[type[Pass]]:
    from qcompiler.core.registry import registry

    try:
        return [cls for cls in registry().passes.values() if prop in cls.produces]
    except Exception:  # the hint must never hide the real error
        return []
