"""``plan --max-latency-ratio R``: a plan the planner may return runs at most ``R`` times the float model's
latency in onnxruntime.

The float model is timed once on the held-back samples (:func:`qcompiler.report.latency.run_timed`: one thread,
the best of 3 passes after a warm-up — the measurement the measured default's ``--max-latency-ratio`` takes), and
every plan the planner could return — each uniform preset measured as a base, each variant, the default or given
base plan, each distinct searched mix, the 16-bit-activation step — is timed the same way right after its real
compile (one over ``R`` timed once more, the lower kept). A plan over ``R`` is not eligible: it is never the base, never returned, and listed with its ratio
(``w4a8-fp8: 2.44x float > 1.5``). When nothing is eligible the planner stops with one line naming the fastest
plan measured (:meth:`LatencyLimit.nothing_eligible`). Without the option nothing is timed: timing never decides
a plain run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.core.errors import UserError
from qcompiler.report.latency import LATENCY_REPEATS, check_ratio, run_timed

log = logging.getLogger("qcompiler.autoplan")


@dataclass
class LatencyLimit:
    """The float model's latency on the held-back samples and every plan timed against it."""

    limit: float
    feeds: list[dict[str, np.ndarray]]
    float_seconds: float
    #: every plan timed: its name -> latency ratio (its seconds over the float model's)
    timed: dict[str, float] = field(default_factory=dict)
    #: the plans over the limit, as reported (``w4a8-fp8: 2.44x float > 1.5``)
    refused: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, model: Path, feeds: list[dict[str, np.ndarray]], limit: float) -> LatencyLimit:
        """Time the float model on ``feeds`` (the held-back samples)."""
        check_ratio(limit)
        _, secs = run_timed(model, feeds)
        log.info("plan: float model %.2f ms on %d held-back sample(s) (onnxruntime, 1 thread, best of %d)",
                 secs * 1e3, len(feeds), LATENCY_REPEATS)
        return cls(limit, feeds, secs)

    def time(self, path: Path, name: str) -> float:
        """The latency ratio of the compiled model at ``path`` (recorded under ``name``). One over the limit is
        timed once more and keeps the lower of the two: other processes' load only adds time, and on a model of
        a few ms a single spike of it moved the same plan from 1.13x to 1.73x float (PP-OCR cls, load 2-3)."""
        _, secs = run_timed(path, self.feeds)
        if self.float_seconds > 0 and secs / self.float_seconds > self.limit:
            secs = min(secs, run_timed(path, self.feeds)[1])
        ratio = secs / self.float_seconds if self.float_seconds > 0 else math.inf
        self.timed[name] = ratio
        if ratio > self.limit:
            self.refused.append(self.why(name, ratio))
            log.info("plan: %s not eligible", self.why(name, ratio))
        return ratio

    def eligible(self, ratio: float | None) -> bool:
        return ratio is None or ratio <= self.limit

    def why(self, name: str, ratio: float) -> str:
        return f"{name}: {ratio:.2f}x float > {self.limit:g}"

    def nothing_eligible(self) -> UserError:
        """The error when no plan the planner could return is within the limit: the fastest one measured."""
        if not self.timed:
            return UserError(f"--max-latency-ratio {self.limit:g}: no plan could be timed")
        name, ratio = min(self.timed.items(), key=lambda kv: kv[1])
        return UserError(f"--max-latency-ratio {self.limit:g}: no plan within it; the fastest measured, {name}, "
                         f"runs at {ratio:.2f}x float (onnxruntime, 1 thread, {len(self.feeds)} held-back "
                         f"sample(s)); {len(self.timed)} plan(s) timed")

    def header(self) -> str:
        """The plan header's line: the limit and what it left out."""
        return (f"max latency ratio: {self.limit:g}x float (onnxruntime, 1 thread, best of {LATENCY_REPEATS} on "
                f"the held-back samples; float {self.float_seconds * 1e3:.3g} ms)"
                + (f"; not eligible: {', '.join(self.refused)}" if self.refused else ""))

    def to_json(self) -> dict[str, Any]:
        return {"max_ratio": self.limit, "float_seconds": self.float_seconds, "timed": dict(self.timed),
                "not_eligible": list(self.refused)}
