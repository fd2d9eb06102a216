"""``qcompiler.report.validate.resample``: the worst-slice SQNR rebuilt from per-sample energies, and the paired
bootstrap the planner decides with. Oracle: ``compare_outputs`` (what ``qcompiler validate`` reports) run on the
resampled samples themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcompiler.report import validate as qv
from qcompiler.report.validate.resample import RESAMPLE_SEED, RESAMPLES, draws, sample_energies, win_rate

H = 10


def _ref(seed: int) -> qv.Reference:
    rng = np.random.default_rng(seed)
    outs = []
    for _ in range(H):
        logits = rng.normal(size=(1, 5)) * 3
        logits[0, 4] = -30.0  # a class never predicted: silent, left out of the ranking
        p = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        feat = rng.normal(size=(1, 4, 3, 3)) * np.array([1.0, 10.0, 0.1, 2.0]).reshape(1, 4, 1, 1)
        outs.append({"prob": p.astype(np.float32), "feat": feat.astype(np.float32),
                     "idx": np.array([int(np.argmax(p))], dtype=np.int64)})
    return qv.Reference(feeds=[], outputs=outs, output_types={"prob": "tensor(float)", "feat": "tensor(float)",
                                                              "idx": "tensor(int64)"},
                        label="float", producers={"prob": "Softmax"})


def _noisy(ref: qv.Reference, seed: int, scale: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for o in ref.outputs:
        out.append({"prob": (o["prob"] + scale * 0.01 * rng.normal(size=o["prob"].shape)).astype(np.float32),
                    "feat": (o["feat"] + scale * 0.05 * rng.normal(size=o["feat"].shape)).astype(np.float32),
                    "idx": o["idx"].copy()})
    return out


def _oracle(ref: qv.Reference, q: list[dict[str, np.ndarray]], idx: np.ndarray) -> float:
    sub = qv.Reference(feeds=[], outputs=[ref.outputs[i] for i in idx], output_types=ref.output_types,
                       label=ref.label, producers=ref.producers)
    return float(qv.compare_outputs(sub, [q[i] for i in idx]).worst_slice_sqnr())


def test_energies_score_is_validations_worst_slice() -> None:
    ref = _ref(0)
    q = _noisy(ref, 1, 1.0)
    e = sample_energies(ref, q)
    assert math.isclose(e.score(), _oracle(ref, q, np.arange(H)), abs_tol=1e-9)
    for idx in list(draws(H, 5)):
        assert math.isclose(e.score(np.bincount(idx, minlength=H)), _oracle(ref, q, idx), abs_tol=1e-9)


def test_win_rate_is_the_share_of_paired_draws() -> None:
    ref = _ref(2)
    a, b = _noisy(ref, 3, 1.0), _noisy(ref, 4, 1.05)
    ea, eb = sample_energies(ref, a), sample_energies(ref, b)
    rng = np.random.default_rng(RESAMPLE_SEED)
    idxs = [rng.integers(0, H, size=H) for _ in range(RESAMPLES)]
    for margin in (0.0, 0.25):
        want = sum(_oracle(ref, a, ix) > _oracle(ref, b, ix) + margin for ix in idxs) / RESAMPLES
        assert win_rate(ea, eb, margin) == want
    got = win_rate(ea, eb)
    assert 0.0 < got < 1.0  # a close call
    assert win_rate(ea, eb) + win_rate(eb, ea) <= 1.0 and win_rate(ea, ea) == 0.0
    assert win_rate(ea, eb, 0.25) <= got  # a margin only takes wins away


def test_a_clear_lead_wins_every_draw_and_sample_counts_must_match() -> None:
    ref = _ref(5)
    good, bad = sample_energies(ref, _noisy(ref, 6, 0.1)), sample_energies(ref, _noisy(ref, 7, 3.0))
    assert win_rate(good, bad, 0.25) == 1.0 and win_rate(bad, good) == 0.0
    short = qv.Reference(feeds=[], outputs=ref.outputs[:4], output_types=ref.output_types, label="float")
    with pytest.raises(ValueError, match="samples"):
        win_rate(good, sample_energies(short, _noisy(ref, 8, 1.0)[:4]))


def test_outputs_whose_slice_axis_changes_length_score_whole_as_validation_does() -> None:
    """A [1, T, D] output with T varying by sample (a sentence encoder's tokens, T <= D: slice axis 1) has no
    slices in validation (the axis changes length); the rebuilt score is then the whole tensor's, as there."""
    rng = np.random.default_rng(11)
    outs = [{"h": rng.normal(size=(1, t, 8)).astype(np.float32)} for t in (3, 5, 4, 6, 2, 7)]
    ref = qv.Reference(feeds=[], outputs=outs, output_types={"h": "tensor(float)"}, label="float")
    q = [{"h": (o["h"] + 0.02 * rng.normal(size=o["h"].shape)).astype(np.float32)} for o in outs]
    e = sample_energies(ref, q)
    for idx in [np.arange(6), *draws(6, 4)]:
        assert math.isclose(e.score(np.bincount(idx, minlength=6)), _oracle(ref, q, idx), abs_tol=1e-9)


def test_vectorized_sqnr_keeps_validations_conventions() -> None:
    """The draws' vectorized SQNR against validation's scalar one on the edge cases: no noise (with and without
    signal), no signal, infinite and NaN energies."""
    from qcompiler.report.validate.metrics import _sqnr
    from qcompiler.report.validate.resample import _sqnr_all

    vals = [0.0, 1e-30, 2.5, 1e30, math.inf, math.nan]
    pairs = [(r, n) for r in vals for n in vals]
    got = _sqnr_all(np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    for (r, n), g in zip(pairs, got, strict=True):
        want = _sqnr(r, n)
        assert (math.isnan(want) and math.isnan(g)) or g == want, (r, n, g, want)
