"""Where the seconds of a compile went: a :class:`Profile` of named, nested steps.

``compile_plan`` makes one :class:`Profile` per compile and makes it the *active* one (a context variable) while
it runs; any code below it — the passes, calibration, the cost report, validation — marks its own work with
``with profile.step("name"):``, which costs two clock reads and does nothing when no profile is active (a
pass run from a test). Steps nest: a step opened inside another is recorded as its child (``calibrate`` →
``calibration runs``), so the table shows what part of a pass or of validation took the time.

The CLI prints :meth:`Profile.table` with ``qcompiler compile --profile`` and the top 3 top-level steps in the
compile summary (:meth:`Profile.top`); the JSON report carries :meth:`Profile.to_json` under ``profile``.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

_ACTIVE: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("qcompiler_profile", default=None)

#: when this module was imported: ``qcompiler/__init__.py`` imports it first, so this is the start of
#: ``import qcompiler`` (see :func:`import_seconds`)
IMPORT_STARTED: float | None = time.perf_counter()
_IMPORT_DONE: float | None = None


@dataclass
class Step:
    """One timed step; ``children`` are the steps opened while it ran, in the order they started."""

    name: str
    seconds: float = 0.0
    calls: int = 0
    children: list[Step] = field(default_factory=list)

    def child(self, name: str) -> Step:
        for c in self.children:
            if c.name == name:
                return c
        c = Step(name)
        self.children.append(c)
        return c

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.name, "seconds": round(self.seconds, 4)}
        if self.calls > 1:
            out["calls"] = self.calls
        if self.children:
            out["steps"] = [c.to_json() for c in self.children]
        return out


class Profile:
    """Named steps with their wall seconds; a step that runs again (``cleanup`` twice) adds up under one name."""

    def __init__(self) -> None:
        self.root = Step("compile")
        self._stack: list[Step] = [self.root]
        self._t0 = time.perf_counter()
        self.total: float | None = None

    # ------------------------------------------------------------------------------------------ recording
    @contextmanager
    def step(self, name: str) -> Iterator[Step]:
        st = self._stack[-1].child(name)
        self._stack.append(st)
        t = time.perf_counter()
        try:
            yield st
        finally:
            st.seconds += time.perf_counter() - t
            st.calls += 1
            self._stack.pop()

    def add(self, name: str, seconds: float) -> Step:
        """A step timed elsewhere (the imports, the pass manager's own clock), under the open step; returns it."""
        st = self._stack[-1].child(name)
        st.seconds += seconds
        st.calls += 1
        return st

    def finish(self) -> float:
        """Stops the clock of the whole compile (the first call counts); returns its seconds."""
        if self.total is None:
            self.total = time.perf_counter() - self._t0 + sum(
                c.seconds for c in self.root.children if c.name == "import")
        return self.total

    @contextmanager
    def active(self) -> Iterator[Profile]:
        """Make this the profile :func:`step` records into, for the ``with`` block."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    # ------------------------------------------------------------------------------------------- reading
    def _total(self) -> float:
        return self.total if self.total is not None else time.perf_counter() - self._t0

    def rows(self) -> list[tuple[str, float, float]]:
        """(step, seconds, share of the compile) depth first, children indented by two spaces, plus an
        ``(other)`` row for the top-level time no step claimed."""
        total = self._total() or 1e-12
        out: list[tuple[str, float, float]] = []

        def walk(st: Step, depth: int) -> None:
            for c in st.children:
                out.append(("  " * depth + c.name, c.seconds, c.seconds / total))
                walk(c, depth + 1)

        walk(self.root, 0)
        other = total - sum(c.seconds for c in self.root.children)
        if other > 0.0005:
            out.append(("(other)", other, other / total))
        return out

    def top(self, n: int = 3) -> list[tuple[str, float, float]]:
        """The ``n`` longest top-level steps: (step, seconds, share)."""
        total = self._total() or 1e-12
        steps = sorted(self.root.children, key=lambda s: -s.seconds)[:n]
        return [(s.name, s.seconds, s.seconds / total) for s in steps]

    def table(self) -> str:
        rows = [(name, f"{sec:.3f}", f"{share * 100:.1f}%") for name, sec, share in self.rows()]
        rows.append(("total", f"{self._total():.3f}", "100.0%"))
        headers = ("step", "seconds", "share")
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(3)]
        lines = [f"{headers[0]:<{widths[0]}}  {headers[1]:>{widths[1]}}  {headers[2]:>{widths[2]}}",
                 "  ".join("-" * w for w in widths)]
        lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": round(self._total(), 4), "steps": [c.to_json() for c in self.root.children]}


def current() -> Profile | None:
    """The active profile, if any."""
    return _ACTIVE.get()


@contextmanager
def step(name: str) -> Iterator[None]:
    """Time the block as step ``name`` of the active profile (nothing when none is active)."""
    prof = _ACTIVE.get()
    if prof is None:
        yield
        return
    with prof.step(name):
        yield


def mark_imported() -> None:
    """Called once the command line's modules are imported: :func:`import_seconds` ends here."""
    global _IMPORT_DONE
    if _IMPORT_DONE is None:
        _IMPORT_DONE = time.perf_counter()


def import_seconds() -> float | None:
    """Seconds from the start of ``import qcompiler`` to :func:`mark_imported`, given once (to the first compile
    of the process); None when unknown (the library used from Python, where the caller's imports are its own
    business) or already given."""
    global IMPORT_STARTED
    if IMPORT_STARTED is None or _IMPORT_DONE is None:
        return None
    seconds = max(0.0, _IMPORT_DONE - IMPORT_STARTED)
    IMPORT_STARTED = None
    return seconds
