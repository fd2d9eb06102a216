"""Where the planner measures plans (:mod:`qcompiler.autoplan.baseline`): the held-back samples, a plan compiled
for real on the others and measured on them, and the rule a mixed plan must meet to replace its base.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.autoplan.latency import LatencyLimit
from qcompiler.autoplan.probes import compiled_cost, held_scores
from qcompiler.autoplan.result import PlanOptions
from qcompiler.calib import spread_indices
from qcompiler.compile import CompileOptions, compile_plan
from qcompiler.plan import Plan
from qcompiler.report import cost
from qcompiler.report import validate as qv
from qcompiler.report.validate.resample import SampleEnergies, win_rate

#: a mixed plan replaces the uniform base only when it measures at least this much better on the held-back
#: samples and on each half of them (:meth:`Measured.beats`; their noise: on silero-vad a mix 0.8 dB above the
#: base on the last 16 calibration samples measured 1.2 dB below it on the eval split; on ppocr_det a mix 0.69 dB
#: above w4a8 on the held-back samples, but only 0.09 dB on one half, measured 0.43 dB below it on eval) and wins
#: :data:`MIX_CONFIDENCE` of their paired bootstrap draws
MIX_MARGIN_DB = 0.25
#: the share of paired bootstrap draws of the held-back samples (:func:`~qcompiler.report.validate.resample.win_rate`)
#: a mixed plan must score above its base on to replace it, besides the margin on each half. PP-OCR rec (session
#: 18): a mix 0.59 dB above `w4a8` held back, +0.81 / +0.31 on the halves, won 64 % of the draws and measured
#: 0.16 dB *below* it on 32 eval lines. The same value as the presets' guard (``qcompiler.recipe.KEEP_CONFIDENCE``)
MIX_CONFIDENCE = 0.8
#: default number of calibration samples held back to measure plans on (at most a quarter of them)
HOLDOUT = 16


@dataclass
class Holdout:
    """Where plans are measured: compiled with ``calib`` (its first ``fit`` samples; ``None``: all), run on
    ``feeds``, described by ``data``."""

    calib: str
    fit: int | None
    feeds: list[dict[str, np.ndarray]]
    data: str
    #: ``--max-latency-ratio``: every plan measured is also timed against the float model (None: nothing timed)
    latency: LatencyLimit | None = None
    #: the float model's outputs on ``feeds``, run once (:func:`~qcompiler.autoplan.probes.held_scores`)
    references: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"samples": len(self.feeds), "calib_samples": self.fit, "data": self.data}


@dataclass
class Measured:
    """A plan compiled for real and run on the held-back samples."""

    sqnr_db: float
    cost: cost.CostReport
    #: the same measure on each half of the held-back samples (even / odd positions); empty: not measured
    halves: tuple[float, ...] = ()
    #: latency over the float model's (``--max-latency-ratio``; None: not timed) and whether it is within the limit
    latency_ratio: float | None = None
    eligible: bool = True
    #: per-sample energies of the held-back scores, for the paired bootstrap (None: not kept)
    energies: SampleEnergies | None = None

    def amount(self, unit: str) -> float:
        return _amount(self.cost, unit)

    def win_rate(self, base: Measured) -> float | None:
        """The share of paired bootstrap draws of the held-back samples on which this plan scores above ``base``
        (None: either's outputs not kept)."""
        if self.energies is None or base.energies is None:
            return None
        return win_rate(self.energies, base.energies)

    def beats(self, base: Measured) -> bool:
        """Whether this (mixed) plan measures better than ``base`` beyond the held-back samples' noise: at least
        :data:`MIX_MARGIN_DB` better on all of them and on each half of them (even / odd positions), *and* above
        it on :data:`MIX_CONFIDENCE` of their paired bootstrap draws (where both kept their energies): a lead in
        both halves won on few draws rests on a few samples, one steady across the draws but absent from a half
        on some (benchmarks/RESULTS.md, session 18)."""
        if _db(self.sqnr_db) < _db(base.sqnr_db) + MIX_MARGIN_DB:
            return False
        if not all(_db(a) >= _db(b) + MIX_MARGIN_DB for a, b in zip(self.halves, base.halves, strict=False)):
            return False
        rate = self.win_rate(base)
        return rate is None or rate >= MIX_CONFIDENCE


def _amount(rep: cost.CostReport, unit: str) -> float:
    if unit == "bytes":
        return float(rep.total_bytes)
    if unit == "bitops":
        return float(rep.bitops)
    bits = rep.average_weight_bits()
    return float(cost.FLOAT_BITS if bits is None else bits)


def _db(x: float) -> float:
    return -math.inf if math.isnan(x) else x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Warnings of one-sample size probes (a preset's rule for ops the model lacks, calibration methods that
    want more samples) say nothing about the plan the user gets: kept out of the user's log."""
    root = logging.getLogger("qcompiler")
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def make_holdout(model_path: str | Path, calib: str | Path | None, opts: PlanOptions,
                 tmp: Path) -> Holdout | None:
    """The samples plans are measured on (see the module docstring); ``None`` when nothing can be measured.
    ``tmp``: a folder for the other samples' calibration files (what the plans are compiled and searched with)."""
    if opts.holdout <= 0 or calib is None or str(calib) in ("none", "random"):
        return None
    src = qv.load_feeds(calib, model_path)
    n = len(src)
    if opts.validate_data is not None:
        val = qv.load_feeds(opts.validate_data, model_path)
        return Holdout(str(calib), None, [dict(f) for f in val], f"the {len(val)} samples of {opts.validate_data}")
    h = min(opts.holdout, n // 4)
    if h == 0:
        return Holdout(str(calib), None, [dict(f) for f in src],
                       f"the {n} calibration sample(s) (too few to hold any back)")
    held = spread_indices(n, h)
    rest = [i for i in range(n) if i not in set(held)]
    folder = tmp / "calib-fit"
    folder.mkdir(parents=True, exist_ok=True)
    for k, feed in enumerate(src.subset(rest)):
        arrays: dict[str, Any] = {name: np.asarray(v) for name, v in feed.items()}
        np.savez(folder / f"{k:06d}.npz", **arrays)
    step = n / h
    return Holdout(str(folder), None, [dict(f) for f in src.subset(held)],
                   f"{h} of the {n} calibration samples spread over them (every {step:g}th), held back "
                   f"(compiled with the other {n - h})")


def measure(model_path: Path, plan: Plan, target: str, hold: Holdout, tmp: Path, tag: str,
            shapes: dict[str, list[int]], want_bitops: bool, label: str | None = None) -> Measured:
    """Compile ``plan`` for real (calibration: ``hold``'s first samples) and measure its worst output SQNR in
    onnxruntime on the held-back samples (:func:`qcompiler.report.validate.validate`, graph outputs only); with
    ``hold.latency``, also its latency ratio (recorded as ``label``)."""
    out = tmp / f"{tag}.onnx"
    res = compile_plan(model_path, out, CompileOptions(plan=plan, target=target, calib=hold.calib,
                                                       calib_samples=hold.fit, validate=False))
    try:
        rep = compiled_cost(res, out, shapes, want_bitops)
        held = held_scores(model_path, out, hold.feeds, hold.references)
        m = Measured(held.whole, rep, held.halves, energies=held.energies)
        if hold.latency is not None:
            m.latency_ratio = hold.latency.time(out, label or tag)
            m.eligible = hold.latency.eligible(m.latency_ratio)
        return m
    finally:
        for f in res.files:
            f.unlink(missing_ok=True)


