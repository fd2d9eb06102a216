"""``Bench.win_rate``: the share of paired bootstrap resamples of the held-back samples on which one candidate
scores above another (what the guard asks before keeping an algorithm that measured worse than without it,
``qcompiler.recipe.KEEP_CONFIDENCE``). Oracle: the worst-slice SQNR computed with numpy on the same draws."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qcompiler.compile import CompileOptions
from qcompiler.plan import Plan
from qcompiler.recipe.measure import Bench, Measured
from qcompiler.report import validate as qv
from qcompiler.report.validate.resample import RESAMPLE_SEED, RESAMPLES

H, F = 12, 6


def _bench(ref: list[dict[str, np.ndarray]], tmp_path: Path) -> Bench:
    bench = Bench(model=tmp_path / "m.onnx", options=CompileOptions(), calib="", fit=(), held=[],
                  float_outputs=[], float_seconds=0.0, workdir=tmp_path)
    bench._reference = qv.Reference(feeds=[], outputs=ref, output_types={"y": "tensor(float)"}, label="float")
    bench._probabilities = []
    return bench


def _oracle(ref: list[dict[str, np.ndarray]], q: list[dict[str, np.ndarray]], idx: np.ndarray) -> float:
    """Worst slice of a [1, F] output (its features, samples pooled), or the whole tensor's SQNR when lower."""
    r = np.stack([ref[i]["y"][0] for i in idx]).astype(np.float64)
    d = r - np.stack([q[i]["y"][0] for i in idx]).astype(np.float64)
    per = 10.0 * np.log10(np.sum(r * r, axis=0) / np.sum(d * d, axis=0))
    return min(float(per.min()), 10.0 * math.log10(float(np.sum(r * r)) / float(np.sum(d * d))))


def _outputs(seed: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    ref = [{"y": rng.normal(size=(1, F)).astype(np.float32)} for _ in range(H)]
    a = [{"y": r["y"] + (0.05 * rng.normal(size=(1, F))).astype(np.float32)} for r in ref]
    b = [{"y": r["y"] + (0.04 * rng.normal(size=(1, F))).astype(np.float32)} for r in ref]
    b[3]["y"] = b[3]["y"] + np.float32(0.4)  # b: better on most samples, one sample far off
    return ref, a, b


def test_win_rate_is_the_share_of_paired_resamples(tmp_path: Path) -> None:
    ref, a, b = _outputs(3)
    bench = _bench(ref, tmp_path)
    ma, mb = (Measured(n, n, Plan.default(), outputs=o) for n, o in (("a", a), ("b", b)))
    # the full held-back set scores as the oracle says (and as validation's worst slice does)
    assert math.isclose(bench.score_on(ma, range(H)), _oracle(ref, a, np.arange(H)), abs_tol=1e-4)
    draws = np.random.default_rng(RESAMPLE_SEED)
    idxs = [draws.integers(0, H, size=H) for _ in range(RESAMPLES)]
    want = sum(_oracle(ref, a, ix) > _oracle(ref, b, ix) for ix in idxs) / RESAMPLES
    got = bench.win_rate(ma, mb)
    assert got == want
    assert 0.0 < got < 1.0  # a close call: neither wins every resample
    # paired and strict: the two rates never sum above 1; a candidate never beats itself
    assert bench.win_rate(ma, mb) + bench.win_rate(mb, ma) <= 1.0
    assert bench.win_rate(ma, ma) == 0.0


def test_win_rate_of_a_clear_lead_is_one(tmp_path: Path) -> None:
    ref, a, _ = _outputs(5)
    far = [{"y": r["y"] + np.float32(0.5)} for r in ref]  # every sample, every feature far off
    bench = _bench(ref, tmp_path)
    ma, mf = Measured("a", "a", Plan.default(), outputs=a), Measured("f", "f", Plan.default(), outputs=far)
    assert bench.win_rate(ma, mf) == 1.0 and bench.win_rate(mf, ma) == 0.0
