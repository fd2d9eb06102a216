"""How much of a lead on a few samples is the samples' doing: the paired bootstrap of the worst output slice's SQNR.

Two quantized models scored on the same h held-back samples differ by a few tenths of a dB; whether the better one
stays better on other samples is what a choice between them rests on. The **paired bootstrap** draws ``h`` of the
samples with replacement (:func:`draws`: :data:`RESAMPLES` draws from a generator seeded :data:`RESAMPLE_SEED`,
the same draws for both models), scores both on each draw and counts the draws the first wins
(:func:`win_rate`).

The score is ``ValidationReport.worst_slice_sqnr`` (what ``qcompiler validate`` and the planner gate on), rebuilt
from per-sample energies so a draw costs a weighted sum, not a validation: every accumulator it reads is a sum
over samples — per output Σref² and Σ(ref−q)² of the whole tensor and of each slice along the output's slice axis
(the axis and the class-score rule of :func:`~qcompiler.report.validate.compare.compare_outputs`) — so a draw that
takes sample i c_i times scores

    min over outputs of  min( 10·log10(Σ c_i·R_i / Σ c_i·N_i),  min over ranked slices s of 10·log10(Σ c_i·R_is / Σ c_i·N_is) )

with the *ranked* slices (those with signal in the float model: :meth:`_SliceAccumulator._silent`) fixed on all h
samples. With every c_i = 1 this is the report's own number (float64 sums in another order: within 1e-9 dB).
Memory: two float64 numbers per sample and slice (:func:`sample_energies`), not the outputs.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler.core.numbers import energies
from qcompiler.report.validate.compare import _GraphFacts, _output_accumulators
from qcompiler.report.validate.reference import Reference
from qcompiler.report.validate.slices import _SliceAccumulator

#: bootstrap draws per comparison
RESAMPLES = 200
#: the draws' generator seed (the same draws every run: a choice made on them is reproducible)
RESAMPLE_SEED = 0


def draws(h: int, resamples: int = RESAMPLES, seed: int = RESAMPLE_SEED) -> Iterator[np.ndarray]:
    """``resamples`` draws of ``h`` sample indices in ``[0, h)`` with replacement, from ``np.random.default_rng(seed)``
    (one ``integers(0, h, size=h)`` call per draw)."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, h, size=h)


@dataclass
class _Output:
    whole_ref2: np.ndarray  # [h]
    whole_noise2: np.ndarray  # [h]
    slice_ref2: np.ndarray | None  # [h, ranked slices]
    slice_noise2: np.ndarray | None


@dataclass
class SampleEnergies:
    """Per sample and output: the energies the worst-slice SQNR is made of (module docstring)."""

    outputs: list[_Output]
    samples: int

    def score(self, counts: np.ndarray | None = None) -> float:
        """The worst output slice's SQNR (dB) with sample i counted ``counts[i]`` times (None: each once); NaN when
        any output's is NaN, ``inf`` when all are identical."""
        c = np.ones(self.samples) if counts is None else np.asarray(counts, dtype=np.float64)
        worst = math.inf
        for o in self.outputs:
            ref2, noise2 = [np.atleast_1d(c @ o.whole_ref2)], [np.atleast_1d(c @ o.whole_noise2)]
            if o.slice_ref2 is not None and o.slice_noise2 is not None:
                ref2.append(c @ o.slice_ref2)
                noise2.append(c @ o.slice_noise2)
            values = _sqnr_all(np.concatenate(ref2), np.concatenate(noise2))
            if np.isnan(values).any():
                return math.nan
            worst = min(worst, float(values.min()))
        return worst


def _sqnr_all(ref2: np.ndarray, noise2: np.ndarray) -> np.ndarray:
    """:func:`~qcompiler.report.validate.metrics._sqnr` of each pair of energies (both ≥ 0), vectorized: no
    noise is ``inf`` (also without signal), no signal ``-inf``, NaN in either NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        db = 10.0 * np.log10(ref2 / noise2)
    return np.where((noise2 == 0.0) & ~np.isnan(ref2), math.inf, db)


def sample_energies(ref: Reference, quant_outputs: Sequence[dict[str, Any]]) -> SampleEnergies:
    """:class:`SampleEnergies` of ``quant_outputs`` (one dict per sample of ``ref``, in its order) against ``ref``."""
    names = ref.names
    facts = _GraphFacts(producers=ref.producers, inputs=set(), outputs=[], float_known={})
    _, slices, _ = _output_accumulators(None, facts, ref.outputs[0], names, {}, ())
    outputs: list[_Output] = []
    for n in names:
        pairs = [(np.asarray(fo[n]), np.asarray(qo[n])) for fo, qo in zip(ref.outputs, quant_outputs, strict=True)]
        r2, n2 = [], []
        for f, q in pairs:
            e_r, e_n = energies(f.astype(np.float64), q.astype(np.float64))  # non-finite values: as validation's
            r2.append(e_r)
            n2.append(e_n)
        out = _Output(np.array(r2), np.array(n2), None, None)
        if n in slices:
            total = _SliceAccumulator(slices[n].axis, slices[n].classes)
            per: list[_SliceAccumulator] = []
            for f, q in pairs:
                total.update(f, q)
                one = _SliceAccumulator(slices[n].axis, slices[n].classes)
                one.update(f, q)
                per.append(one)
            if total.bad is None and total.ref2 is not None:
                silent = total._silent()
                ranked = ~silent if not silent.all() else np.ones_like(silent)
                out.slice_ref2 = np.stack([np.asarray(p.ref2)[ranked] for p in per])
                out.slice_noise2 = np.stack([np.asarray(p.noise2)[ranked] for p in per])
        outputs.append(out)
    return SampleEnergies(outputs, len(ref.outputs))


def win_rate(a: SampleEnergies, b: SampleEnergies, margin_db: float = 0.0, resamples: int = RESAMPLES) -> float:
    """The share of paired bootstrap draws (:func:`draws`) on which ``a`` scores more than ``margin_db`` above
    ``b`` (both measured on the same samples)."""
    if a.samples != b.samples:
        raise ValueError(f"win_rate: {a.samples} vs {b.samples} samples")
    wins = 0
    for idx in draws(a.samples, resamples):
        counts = np.bincount(idx, minlength=a.samples)
        sa, sb = a.score(counts), b.score(counts)
        wins += (-math.inf if math.isnan(sa) else sa) > (-math.inf if math.isnan(sb) else sb) + margin_db
    return wins / resamples
