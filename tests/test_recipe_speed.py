"""What makes a measured candidate cheap (issue 15 with the measured default of issue 14): candidates scored
against float outputs computed once (qcompiler.report.validate.reference, Bench.reference), calibration
statistics shared through the process's statistics cache (qcompiler.calib.statcache), no cost report in
candidate compiles — and none of it changes a number or a byte."""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import pytest
from _graphs import matmul_relu_graph

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import CalibrationSource, collect, input_signatures, reset_stats_cache, stats_cache
from qcompiler.calib.statcache import CACHE_ENV, default_max_bytes
from qcompiler.calib.stats import TensorStats
from qcompiler.compile import compile_plan
from qcompiler.plan import Plan, QuantSpec, load_plan
from qcompiler.recipe import measure
from qcompiler.recipe.measure import Bench, held_back, run_timed, score, written_bytes
from qcompiler.report import validate as qv

collect_module = importlib.import_module("qcompiler.calib.collect")  # the package's `collect` is the function

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _folder(tmp: Path, n: int = 6, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(tmp / f"{i:03d}.npz", x=rng.standard_normal((2, 6)).astype(np.float32))
    return tmp


def _source(graph, folder: Path) -> CalibrationSource:
    return CalibrationSource.from_arg(str(folder), input_signatures(graph))


def _fields(st: TensorStats) -> tuple:
    return (st.min, st.max, st.count, st.samples, st.zeros, st.nonfinite, st.range_exp, st.bins,
            None if st.hist is None else st.hist.tobytes())


def _no_session(*a, **k):
    raise AssertionError("a cache hit must not build a session")


# ------------------------------------------------------------------------------------------ statistics cache
def test_second_collection_comes_from_the_cache_equal_field_for_field(tmp_path: Path, monkeypatch) -> None:
    graph = matmul_relu_graph()
    src = _source(graph, _folder(tmp_path / "calib"))
    specs = {"h": QuantSpec(dtype="uint8", calibration="percentile"), "y": QuantSpec(dtype="uint8")}
    first = collect(graph, specs, src, workers=1)
    shapes: dict = {}
    fresh_shapes: dict = {}
    reset_stats_cache()
    collect(graph, specs, src, workers=1, shapes=fresh_shapes)  # filled with shapes this time
    monkeypatch.setattr(collect_module, "graph_session", _no_session)
    again = collect(graph, specs, src, workers=2, shapes=shapes)
    assert {k: _fields(v) for k, v in again.items()} == {k: _fields(v) for k, v in first.items()}
    assert shapes == fresh_shapes and {"x", "h", "y"} <= set(shapes)
    assert stats_cache().hits == 1
    # copies: merging into what a hit gave (calibration auto does) leaves the cache as it was
    again["h"].merge(first["h"])
    assert _fields(collect(graph, specs, src)["h"]) == _fields(first["h"])


def test_minmax_is_served_by_a_histogram_collection_with_the_same_ranges(tmp_path: Path, monkeypatch) -> None:
    graph = matmul_relu_graph()
    src = _source(graph, _folder(tmp_path / "calib"))
    pct = {"h": QuantSpec(dtype="uint8", calibration="percentile"), "y": QuantSpec(dtype="uint8",
                                                                                    calibration="entropy")}
    mm = {"h": QuantSpec(dtype="uint8"), "y": QuantSpec(dtype="uint8")}
    reset_stats_cache(0)
    fresh = collect(graph, mm, src, workers=1)  # no cache: what a minmax collection gives
    reset_stats_cache()
    collect(graph, pct, src, workers=1)
    monkeypatch.setattr(collect_module, "graph_session", _no_session)
    served = collect(graph, mm, src, workers=1)
    assert {k: _fields(v) for k, v in served.items()} == {k: _fields(v) for k, v in fresh.items()}
    assert all(served[k].range(mm[k]) == fresh[k].range(mm[k]) for k in mm)
    # the other way round misses: a minmax collection has no histogram for a percentile range
    monkeypatch.undo()
    reset_stats_cache()
    collect(graph, mm, src, workers=1)
    monkeypatch.setattr(collect_module, "graph_session", _no_session)
    with pytest.raises(AssertionError, match="must not build a session"):
        collect(graph, pct, src, workers=1)


def test_other_samples_graph_or_tensors_miss(tmp_path: Path, monkeypatch) -> None:
    graph = matmul_relu_graph()
    folder = _folder(tmp_path / "calib")
    src = _source(graph, folder)
    spec = {"h": QuantSpec(dtype="uint8")}
    collect(graph, spec, src, workers=1)
    monkeypatch.setattr(collect_module, "graph_session", _no_session)
    collect(graph, spec, src.take(6), workers=1)  # the same six samples: a hit
    collect(graph, spec, src.subset(range(6)), workers=1)
    for other in (src.take(5), src.subset([0, 2, 4])):
        with pytest.raises(AssertionError, match="must not build a session"):
            collect(graph, spec, other, workers=1)
    with pytest.raises(AssertionError, match="must not build a session"):
        collect(graph, {"h": QuantSpec(dtype="uint8"), "y": QuantSpec(dtype="uint8")}, src, workers=1)
    g2 = matmul_relu_graph()
    w = g2.tensors()["w"]
    w.values = np.asarray(w.values) * 1.5  # a weight rewritten (smooth, equalize): another graph
    with pytest.raises(AssertionError, match="must not build a session"):
        collect(g2, spec, _source(g2, folder), workers=1)
    # a file changed in place, its timestamps put back: its content decides
    f = folder / "002.npz"
    st = f.stat()
    np.savez(f, x=np.full((2, 6), 7.0, np.float32))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="must not build a session"):
        collect(graph, spec, _source(graph, folder), workers=1)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_a_cached_prefix_is_merged_with_the_rest_exactly(tmp_path: Path, monkeypatch, method: str) -> None:
    """The candidates calibrate on the first N - h samples, the confirmation and the final compile on all N:
    only the last h run, and the merged statistics are those of one pass."""
    graph = matmul_relu_graph()
    folder = _folder(tmp_path / "calib", n=9, seed=5)
    src = _source(graph, folder)
    specs = {"h": QuantSpec(dtype="uint8", calibration=method), "y": QuantSpec(dtype="int8", calibration=method),
             "x": QuantSpec(dtype="int8", calibration=method)}
    reset_stats_cache(0)
    one_pass: dict = {}
    fresh = collect(graph, specs, src, workers=1, shapes=one_pass)
    reset_stats_cache()
    collect(graph, specs, src.take(6), workers=2, shapes={})
    ran: list[int] = []
    real = collect_module._run_samples
    monkeypatch.setattr(collect_module, "_run_samples", lambda sess, group, source, *a: ran.append(len(source))
                        or real(sess, group, source, *a))
    calls: list = []
    shapes: dict = {}
    merged = collect(graph, specs, src, workers=2, shapes=shapes, progress=lambda d, t: calls.append((d, t)))
    assert ran == [3] and stats_cache().partial_hits == 1
    assert {k: _fields(v) for k, v in merged.items()} == {k: _fields(v) for k, v in fresh.items()}
    assert all(merged[k].range(specs[k]) == fresh[k].range(specs[k]) for k in specs)
    assert shapes == one_pass and calls == [(i, 9) for i in range(1, 10)]
    # and the whole now comes from the cache
    assert {k: _fields(v) for k, v in collect(graph, specs, src).items()} == {k: _fields(v) for k, v in fresh.items()}
    assert ran == [3] and stats_cache().hits == 1


def test_random_and_in_memory_sources_and_a_zero_cap_keep_nothing(tmp_path: Path, monkeypatch) -> None:
    graph = matmul_relu_graph()
    spec = {"h": QuantSpec(dtype="uint8")}
    collect(graph, spec, CalibrationSource.from_arg("random", input_signatures(graph)), workers=1)
    feeds = [{"x": np.ones((2, 6), np.float32)}]
    collect(graph, spec, CalibrationSource.from_feeds(feeds, input_signatures(graph)), workers=1)
    assert len(stats_cache()) == 0
    monkeypatch.setenv(CACHE_ENV, "0")
    assert default_max_bytes() == 0
    reset_stats_cache()
    collect(graph, spec, _source(graph, _folder(tmp_path / "calib")), workers=1)
    assert len(stats_cache()) == 0 and stats_cache().nbytes == 0


def test_the_cache_stays_under_its_cap(tmp_path: Path) -> None:
    graph = matmul_relu_graph()
    spec = {"h": QuantSpec(dtype="uint8", calibration="percentile")}
    one = TensorStats(histogram=True).nbytes + 256
    cache = reset_stats_cache(int(2.5 * one))
    for i in range(4):
        collect(graph, spec, _source(graph, _folder(tmp_path / f"c{i}", seed=i)), workers=1)
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 2  # the least recently used went first


# ---------------------------------------------------------------------------------------------- the score
def _bench(model: Path, npz: Path, tmp: Path) -> Bench:
    fit, held = held_back(str(npz), model, None)
    outputs, secs = run_timed(model, held)
    return Bench(model=model, options=CompileOptions(calib=str(npz)), calib=str(npz), fit=fit, held=held,
                 float_outputs=outputs, float_seconds=secs, workdir=tmp)


@pytest.mark.parametrize("name", ["gemm_head", "conv_bn_relu", "transformer_block"])
def test_score_against_the_reference_is_validates_number(tmp_path: Path, name: str, monkeypatch) -> None:
    model, npz = MODELS / f"{name}.onnx", MODELS / f"{name}.npz"
    bench = _bench(model, npz, tmp_path)
    runs = []
    real = qv.float_reference
    monkeypatch.setattr(measure.qv, "float_reference", lambda *a, **k: runs.append(1) or real(*a, **k))
    for plan_name in ("default", "w8a8"):
        plan = Plan.default() if plan_name == "default" else load_plan("w8a8")
        plan.guard = "off"
        out, _ = bench.run(plan, plan_name)
        full = qv.validate(model, out, bench.held, per_layer=False)
        fast = bench.validate(ir.load_model(out, check=False), out)
        assert score(fast) == score(full)  # the same number, not a close one
        assert fast.to_json() == full.to_json()
        m = bench.measure(plan, plan_name + "-m", "")
        assert m.sqnr_db == score(full) and not m.error
    assert runs == [1]  # the float model ran once for every candidate


def test_a_confirmation_is_scored_but_not_timed(tmp_path: Path, monkeypatch) -> None:
    model, npz = MODELS / "gemm_head.onnx", MODELS / "gemm_head.npz"
    bench = _bench(model, npz, tmp_path)
    repeats: list[int] = []
    real = measure.run_timed
    monkeypatch.setattr(measure, "run_timed", lambda m, f, repeats_=3, **k: repeats.append(k.get("repeats", 3))
                        or real(m, f, **k))
    cand = bench.measure(Plan.default(), "default", "")
    conf = bench.measure(Plan.default(), "default-all", "", samples=10**9)
    assert repeats == [3]  # the candidate timed best-of-3; the confirmation (no task metric) not run again
    assert np.isfinite(cand.latency_ratio) and conf.latency_ratio == np.inf and not conf.error
    full = qv.validate(model, tmp_path / "default-all.onnx", bench.held, per_layer=False)
    assert conf.sqnr_db == score(full)


def test_candidate_bytes_are_the_cost_reports_total_bytes(tmp_path: Path) -> None:
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    out = tmp_path / "q.onnx"
    r = compile_plan(model, out, CompileOptions(calib=str(npz), validate=False))
    assert r.report["cost"]["total_bytes"] == written_bytes(out)
    out2 = tmp_path / "q2.onnx"
    r2 = compile_plan(model, out2, CompileOptions(calib=str(npz), validate=False, cost_report=False))
    assert r2.report["cost"] == {} and "cost report" not in {s["step"] for s in r2.report["profile"]["steps"]}
    assert out2.read_bytes() == out.read_bytes()


# ------------------------------------------------------------------------------------------ byte identity
def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,kw", [("conv_bn_relu", {"preset": "w8a8"}), ("gemm_head", {"plan": "auto", "effort": "normal"}),
                                     ("transformer_block", {"preset": "w8a8"})])
def test_compiled_file_is_the_same_with_and_without_the_cache(tmp_path: Path, name: str, kw: dict) -> None:
    model, npz = MODELS / f"{name}.onnx", MODELS / f"{name}.npz"
    reset_stats_cache(0)
    off = tmp_path / "off.onnx"
    compile_model(model, off, CompileOptions(calib=str(npz), validate=False, **kw))
    cache = reset_stats_cache()
    on = tmp_path / "on.onnx"
    r = compile_model(model, on, CompileOptions(calib=str(npz), validate=False, **kw))
    assert cache.hits >= 1, "the candidates shared no statistics"
    assert _digest(on) == _digest(off)
    assert (tmp_path / "on.plan.yaml").read_bytes() == (tmp_path / "off.plan.yaml").read_bytes()
    assert [c["sqnr_db"] for c in r.report["recipe"]["candidates"]] == [
        c["sqnr_db"] for c in compile_model(model, tmp_path / "again.onnx", CompileOptions(
            calib=str(npz), validate=False, **kw)).report["recipe"]["candidates"]]
