"""The measured default's pipeline cost around its compiles (issue 15): the plain default plan's statistics collected
once for the `calibration: auto` candidate too (`CompileOptions.collect_for_auto` -> the calibrate pass ->
`collect(..., for_auto=True)`), and the confirmation
on all samples skipped when the winner leads the default plan by CONFIRM_MARGIN_DB — neither changes a byte."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import pytest
from _graphs import matmul_relu_graph

import qcompiler.recipe as recipe
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import (
    AUTO_HELD_SAMPLES,
    CalibrationSource,
    collect,
    input_signatures,
    reset_stats_cache,
    stats_cache,
)
from qcompiler.calib.statcache import auto_parts
from qcompiler.calib.stats import TensorStats
from qcompiler.plan import QuantSpec
from qcompiler.recipe.measure import Bench

collect_module = importlib.import_module("qcompiler.calib.collect")  # the package's `collect` is the function
MODELS = Path(__file__).resolve().parents[1] / "models"


pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _folder(tmp: Path, n: int, seed: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = rng.standard_normal((2, 6)).astype(np.float32)
        x[0, i % 6] = 0.0  # exact zeros: the histogram methods count them
        np.savez(tmp / f"{i:03d}.npz", x=x)
    return tmp


def _fields(st: TensorStats) -> tuple:
    return (st.min, st.max, st.count, st.samples, st.zeros, st.nonfinite, st.range_exp, st.bins,
            None if st.hist is None else st.hist.tobytes())


def _no_session(*a, **k):
    raise AssertionError("served from the cache: no session")


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_auto_parts_are_calibration_autos_hold_out() -> None:
    assert auto_parts(64) == [range(48), range(48, 64)]  # min(16, N / 4) last samples
    assert auto_parts(12) == [range(9), range(9, 12)]
    assert auto_parts(3) == [range(3)]  # nothing held out below 4 samples
    assert AUTO_HELD_SAMPLES == 16


def test_collect_for_auto_gives_what_was_asked_and_keeps_the_parts_auto_reads(tmp_path: Path, monkeypatch) -> None:
    graph = matmul_relu_graph()
    src = CalibrationSource.from_arg(str(_folder(tmp_path / "calib", 12)), input_signatures(graph))
    minmax = {"x": QuantSpec(dtype="int8"), "h": QuantSpec(dtype="uint8"), "y": QuantSpec(dtype="uint8")}
    auto = {k: QuantSpec(dtype=v.dtype, calibration="auto") for k, v in minmax.items()}
    reset_stats_cache(0)  # fresh collections, nothing kept
    fresh_shapes: dict = {}
    plain = collect(graph, minmax, src, workers=1, shapes=fresh_shapes)
    fit, held = (collect(graph, auto, src.subset(part), workers=1) for part in auto_parts(len(src)))
    whole = collect(graph, auto, src, workers=1)
    assert all(st.has_histogram for st in whole.values())

    reset_stats_cache()
    shapes: dict = {}
    calls: list = []
    built: list = []
    real_session = collect_module.graph_session
    monkeypatch.setattr(collect_module, "graph_session", lambda *a, **k: built.append(1) or real_session(*a, **k))
    got = collect(graph, minmax, src, workers=2, shapes=shapes, progress=lambda d, t: calls.append((d, t)),
                  for_auto=True)
    assert len(built) == 1  # one session for both parts
    # what a minmax collection gives, field for field (no histogram, no zeros counted), and its shapes
    assert {k: _fields(v) for k, v in got.items()} == {k: _fields(v) for k, v in plain.items()}
    assert not any(st.has_histogram for st in got.values())
    assert shapes == fresh_shapes and calls == [(i, 12) for i in range(1, 13)]
    # calibration auto's first N - h and last h samples, and all of them, now come from the cache, equal to fresh
    monkeypatch.setattr(collect_module, "graph_session", _no_session)
    cache = stats_cache()
    for part, want in zip(auto_parts(len(src)), (fit, held), strict=True):
        served = collect(graph, auto, src.subset(part), workers=1)
        assert {k: _fields(v) for k, v in served.items()} == {k: _fields(v) for k, v in want.items()}
    assert {k: _fields(v) for k, v in collect(graph, auto, src).items()} == {k: _fields(v) for k, v in whole.items()}
    assert {k: _fields(v) for k, v in collect(graph, minmax, src).items()} == \
        {k: _fields(v) for k, v in plain.items()}
    assert cache.hits == 4 and cache.partial_hits == 0


def test_collect_for_auto_leaves_a_histogram_collection_and_a_hit_as_they_were(tmp_path: Path, monkeypatch) -> None:
    graph = matmul_relu_graph()
    src = CalibrationSource.from_arg(str(_folder(tmp_path / "calib", 8)), input_signatures(graph))
    pct = {"h": QuantSpec(dtype="uint8", calibration="percentile")}
    ran: list[int] = []
    real = collect_module._run_samples
    monkeypatch.setattr(collect_module, "_run_samples", lambda sess, group, source, *a: ran.append(len(source))
                        or real(sess, group, source, *a))
    collect(graph, pct, src, workers=1, for_auto=True)  # every tensor wants a histogram already: one pass
    assert ran == [8]
    collect(graph, {"h": QuantSpec(dtype="uint8")}, src, workers=1, for_auto=True)  # served by that entry: no run
    assert ran == [8] and stats_cache().hits == 1


def _count_runs(monkeypatch) -> list[int | None]:
    runs: list[int | None] = []
    real = Bench.run

    def run(self, plan, name, *, samples=None, **kw):
        runs.append(samples)
        return real(self, plan, name, samples=samples, **kw)

    monkeypatch.setattr(Bench, "run", run)
    return runs


@pytest.mark.parametrize("name", ["conv_bn_relu", "transformer_block"])
def test_measured_default_is_byte_identical_with_and_without_collect_for_auto(tmp_path: Path, name: str,
                                                                              monkeypatch) -> None:
    model, npz = MODELS / f"{name}.onnx", MODELS / f"{name}.npz"
    on = tmp_path / "on.onnx"
    r_on = compile_model(model, on, CompileOptions(calib=str(npz), validate=False))
    hits_on = stats_cache().hits
    reset_stats_cache()
    asked: list[bool] = []
    real_run = Bench.run

    def run_without(self, plan, name, *, collect_for_auto=False, **kw):
        asked.append(collect_for_auto)
        return real_run(self, plan, name, collect_for_auto=False, **kw)

    monkeypatch.setattr(Bench, "run", run_without)
    off = tmp_path / "off.onnx"
    r_off = compile_model(model, off, CompileOptions(calib=str(npz), validate=False))
    assert _digest(on) == _digest(off)
    assert r_on.report["recipe"]["winner"] == r_off.report["recipe"]["winner"]
    assert [c["sqnr_db"] for c in r_on.report["recipe"]["candidates"]] == \
        [c["sqnr_db"] for c in r_off.report["recipe"]["candidates"]]
    assert asked[0] and not any(asked[1:])  # asked for by the default plan's candidate only
    # the range-auto candidate's two collections came from the default plan's
    assert hits_on >= stats_cache().hits + 2


def test_confirmation_skipped_only_when_the_winner_leads_by_the_margin(tmp_path: Path, monkeypatch) -> None:
    """conv_bn_relu: w8a8 wins by 5.6 dB: confirmed at the shipped margin; with the margin at 0 (and 8 held-back
    samples enough) the confirmation is skipped, with the same file."""
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    runs = _count_runs(monkeypatch)
    confirmed = tmp_path / "confirmed.onnx"
    r1 = compile_model(model, confirmed, CompileOptions(calib=str(npz), validate=False))
    rec1 = r1.report["recipe"]
    lead = next(c["sqnr_db"] for c in rec1["candidates"]
                if c["name"] == rec1["winner"]) - rec1["candidates"][0]["sqnr_db"]
    assert rec1["winner"] != "default" and 0 < lead < recipe.CONFIRM_MARGIN_DB
    assert [s for s in runs if s is not None] == [10**9, 10**9]  # winner and default plan on all samples
    assert any(n.startswith("calibrated on all samples:") for n in rec1["notes"])
    runs.clear()
    reset_stats_cache()
    monkeypatch.setattr(recipe, "CONFIRM_MARGIN_DB", 0.0)
    monkeypatch.setattr(recipe, "CONFIRM_MIN_HELD", 8)  # 32 samples: 8 held back
    skipped = tmp_path / "skipped.onnx"
    r2 = compile_model(model, skipped, CompileOptions(calib=str(npz), validate=False))
    rec2 = r2.report["recipe"]
    assert rec2["winner"] == rec1["winner"] and all(s is None for s in runs)  # no compile on all samples
    assert any(n.startswith(f"not re-measured on all samples: {rec2['winner']} leads the default plan by")
               and n.endswith("dB on the 8 held-back samples (>= 0 dB)") for n in rec2["notes"])
    assert _digest(skipped) == _digest(confirmed)
    # a task metric decides: always confirmed (its scale is the user's)
    runs.clear()
    metric = tmp_path / "m.py"
    metric.write_text("import numpy as np\n"
                      "def neg_mse(q, f, feeds):\n"
                      "    return -float(np.mean([np.mean((q[i][k] - f[i][k]) ** 2) for i in range(len(q)) "
                      "for k in f[i]]))\n")
    r3 = compile_model(model, tmp_path / "metric.onnx",
                       CompileOptions(calib=str(npz), validate=False, task_metric=f"{metric}:neg_mse"))
    assert r3.report["recipe"]["winner"] != "default"
    assert [s for s in runs if s is not None] == [10**9, 10**9]


def test_few_held_back_samples_always_confirm(tmp_path: Path, monkeypatch) -> None:
    """4 samples, 1 held back: dynamic-matmul leads the default plan by 19 dB there, beyond the margin, and loses to
    it once both calibrate on all 4 samples: the confirmation runs (fewer than CONFIRM_MIN_HELD held back) and keeps
    the default plan."""
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    runs = _count_runs(monkeypatch)
    r = compile_model(model, tmp_path / "q.onnx", CompileOptions(calib=str(npz), calib_samples=4, validate=False))
    rec = r.report["recipe"]
    best = max((c for c in rec["candidates"] if not c.get("error")), key=lambda c: c["sqnr_db"])
    assert best["name"] == "dynamic-matmul" and best["sqnr_db"] - rec["candidates"][0]["sqnr_db"] >= \
        recipe.CONFIRM_MARGIN_DB
    assert [s for s in runs if s is not None] == [4, 4]  # winner and default plan on all 4 samples
    assert rec["winner"] == "default" and "the default plan kept: the winner lost to it once calibrated on all " \
        "samples" in rec["notes"]


def test_collect_for_auto_is_a_compile_option_passed_to_calibrate(tmp_path: Path, monkeypatch) -> None:
    """`CompileOptions.collect_for_auto` reaches the calibrate pass (no thread-local mode left in calib): the plain
    default plan's compile with it writes the same file as without, and a later `calibration: auto` compile of the
    same model on the same samples runs no calibration session (both of its collections are cache hits)."""
    import qcompiler.calib.statcache as statcache
    from qcompiler.plan import Plan
    from qcompiler.recipe.candidates import recipe_candidates

    assert not hasattr(statcache, "collect_for_auto") and not hasattr(statcache, "collecting_for_auto")
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    plain, asked = tmp_path / "plain.onnx", tmp_path / "asked.onnx"
    compile_model(model, plain, CompileOptions(plan="default", calib=str(npz), validate=False))
    reset_stats_cache()
    compile_model(model, asked, CompileOptions(plan="default", calib=str(npz), validate=False,
                                               collect_for_auto=True))
    assert _digest(plain) == _digest(asked)
    auto = next(c.plan for c in recipe_candidates(Plan.default(), {"Conv"}) if c.name == "range-auto")
    runs: list[int] = []
    real = collect_module._run_groups
    monkeypatch.setattr(collect_module, "_run_groups", lambda *a, **k: runs.append(1) or real(*a, **k))
    hits = stats_cache().hits
    compile_model(model, tmp_path / "auto.onnx", CompileOptions(plan=auto, calib=str(npz), validate=False))
    assert runs == [] and stats_cache().hits == hits + 2
    # without the option the same auto compile collects (the default plan's minmax entry has no histograms)
    reset_stats_cache()
    compile_model(model, tmp_path / "plain2.onnx", CompileOptions(plan="default", calib=str(npz), validate=False))
    compile_model(model, tmp_path / "auto2.onnx", CompileOptions(plan=auto, calib=str(npz), validate=False))
    assert len(runs) == 1 + 2  # the default plan's collection, then auto's two parts
    assert _digest(tmp_path / "auto.onnx") == _digest(tmp_path / "auto2.onnx")


def test_a_collection_is_served_from_a_larger_one_on_the_same_graph_after_its_first_sample_checks(
        tmp_path: Path, monkeypatch) -> None:
    """A collection of some tensors on a graph and samples a cached collection ran with more tensors (the default
    plan's candidate; w8a8's and dynamic-matmul's tensors are a part of its on rec and the ViT) runs its own session
    on the first sample only: when every tensor's values there match the larger session's (digests) it takes the
    statistics from the cache, equal field for field to its own collection; when they differ it collects."""
    graph = matmul_relu_graph()
    src = CalibrationSource.from_arg(str(_folder(tmp_path / "calib", 12)), input_signatures(graph))
    big = {"x": QuantSpec(dtype="int8"), "h": QuantSpec(dtype="uint8"), "y": QuantSpec(dtype="uint8")}
    small = {"y": QuantSpec(dtype="uint8", calibration="percentile")}  # a histogram: the larger one has them
    reset_stats_cache(0)
    want_shapes: dict = {}
    fresh = collect(graph, small, src, workers=1, shapes=want_shapes)
    reset_stats_cache()
    collect(graph, big, src, workers=1, for_auto=True, shapes={})
    runs: list[int] = []
    real = collect_module._run_samples
    monkeypatch.setattr(collect_module, "_run_samples", lambda sess, group, source, *a: runs.append(len(source))
                        or real(sess, group, source, *a))
    shapes: dict = {}
    served = collect(graph, small, src, workers=1, shapes=shapes)
    assert runs == [1] and stats_cache().superset_hits == 1  # the first sample only
    assert {k: _fields(v) for k, v in served.items()} == {k: _fields(v) for k, v in fresh.items()}
    assert shapes == want_shapes  # the first-sample shapes of this collection's tensors, inputs and outputs only
    # a mismatch on the first sample: collected (the session built for the check is used), the same statistics
    reset_stats_cache()
    collect(graph, big, src, workers=1, for_auto=True)
    runs.clear()
    monkeypatch.setattr(collect_module, "first_digest", lambda v: str(np.asarray(v).sum()) + "?")
    built: list = []
    real_session = collect_module.graph_session
    monkeypatch.setattr(collect_module, "graph_session", lambda *a, **k: built.append(1) or real_session(*a, **k))
    again = collect(graph, small, src, workers=1)
    assert runs == [1, 12] and len(built) == 1
    assert {k: _fields(v) for k, v in again.items()} == {k: _fields(v) for k, v in fresh.items()}
    # other samples, or the same tensors on another graph: no superset
    reset_stats_cache()
    collect(graph, big, src.subset(range(8)), workers=1)
    runs.clear()
    collect(graph, small, src, workers=1)
    assert runs == [12] and stats_cache().superset_hits == 0


@pytest.mark.parametrize(("name", "serves"), [("conv_bn_relu", True), ("transformer_block", False)])
def test_measured_default_is_byte_identical_with_and_without_serving_subsets(tmp_path: Path, name: str, serves: bool,
                                                                             monkeypatch) -> None:
    model, npz = MODELS / f"{name}.onnx", MODELS / f"{name}.npz"
    on, off = tmp_path / "on.onnx", tmp_path / "off.onnx"
    r_on = compile_model(model, on, CompileOptions(calib=str(npz), validate=False))
    served = stats_cache().superset_hits
    reset_stats_cache()
    monkeypatch.setattr(collect_module, "SERVE_SUBSETS", False)
    r_off = compile_model(model, off, CompileOptions(calib=str(npz), validate=False))
    assert _digest(on) == _digest(off)
    assert [c["sqnr_db"] for c in r_on.report["recipe"]["candidates"]] == \
        [c["sqnr_db"] for c in r_off.report["recipe"]["candidates"]]
    assert (served >= 1) == serves and stats_cache().superset_hits == 0
