"""The measured default's final validation takes the float outputs its candidates' calibration computed (issue 15).

The candidates calibrate on the N - h fit samples and run the float graph on them; they keep those samples' graph
outputs in the statistics cache (``CompileOptions.share_float_outputs``, ``StatsCache.keep_sample_outputs``, by
the collection's session and each sample's content id, bounded in bytes). The final compile, served its statistics
from the cache, finds them and hands them to its validation as its own calibration runs would have: the float
model runs on none of the fit samples, the held-back ones come from the recipe's reference, and the report is the
report of the same compile with the statistics cache off (calibration then runs every sample itself)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from _graphs import matmul_relu_graph
from _helpers import count_float_runs, npz_folder

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import (
    CalibrationSource,
    FloatOutputs,
    collect,
    held_back_indices,
    input_signatures,
    reset_stats_cache,
    stats_cache,
)
from qcompiler.calib.statcache import StatsCache
from qcompiler.plan import QuantSpec

compare = importlib.import_module("qcompiler.report.validate.compare")
statcache = importlib.import_module("qcompiler.calib.statcache")
compile_module = importlib.import_module("qcompiler.compile")
fold_batchnorm = importlib.import_module("qcompiler.passes.fold_batchnorm")
MODELS = Path(__file__).resolve().parents[1] / "models"
N = 8
pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _npz(tmp: Path, name: str = "conv_bn_relu") -> str:
    """The fixture's first N samples as one stacked .npz."""
    data = {k: v[:N] for k, v in np.load(MODELS / f"{name}.npz").items()}
    path = tmp / f"{name}-{N}.npz"
    np.savez(path, **data)
    return str(path)


def _report(res) -> str:
    return json.dumps(res.report["validation"], sort_keys=True)


HELD = held_back_indices(N)
FIT = [i for i in range(N) if i not in HELD]


@pytest.mark.parametrize("name", ["conv_bn_relu", "transformer_block"])
def test_final_validation_runs_the_float_model_on_no_fit_sample_and_reports_as_with_the_cache_off(
        tmp_path: Path, name: str, monkeypatch) -> None:
    model, npz = MODELS / f"{name}.onnx", _npz(tmp_path, name)
    assert HELD == [3, 7] and 0 in FIT
    runs = count_float_runs(monkeypatch)
    reused = compile_model(model, tmp_path / "a.onnx", CompileOptions(calib=npz))
    assert runs == []  # fit samples: the candidates' calibration runs; held-back: the recipe's reference
    assert reused.validation is not None and reused.validation.samples == N
    assert reused.report["validation"]["float_from_calibration"] == len(FIT)
    assert stats_cache().sample_hits >= len(FIT)

    reset_stats_cache(0)  # the statistics cache off: the final compile's calibration runs every sample itself
    runs.clear()
    off = compile_model(model, tmp_path / "b.onnx", CompileOptions(calib=npz))
    assert runs == []
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert _report(reused) == _report(off)  # every number, bit for bit as printed


def test_without_the_candidates_outputs_the_float_model_runs_the_fit_samples_same_file(tmp_path, monkeypatch):
    """The reuse turned off (nothing kept): validation runs the float model on the fit samples, as before."""
    model, npz = MODELS / "conv_bn_relu.onnx", _npz(tmp_path)
    monkeypatch.setattr(StatsCache, "sample_outputs", lambda *a, **k: {})
    runs = count_float_runs(monkeypatch)
    plain = compile_model(model, tmp_path / "a.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == FIT
    assert "float_from_calibration" not in plain.report["validation"]
    monkeypatch.undo()
    reset_stats_cache()
    reused = compile_model(model, tmp_path / "b.onnx", CompileOptions(calib=npz))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert reused.report["validation"]["float_from_calibration"] == len(FIT)
    a, b = plain.validation, reused.validation
    assert a is not None and b is not None and a.samples == b.samples == N
    for x, y in zip(a.outputs, b.outputs, strict=True):  # float rounding of an equivalent graph at most
        assert x.name == y.name and abs(x.sqnr_db - y.sqnr_db) < 1e-3


def test_over_the_bound_the_rest_is_recomputed_same_numbers(tmp_path, monkeypatch):
    """Kept outputs are bounded (the store: ``statcache.OUTPUTS_MAX_BYTES``; each calibration's: the compile's
    ``FLOAT_OUTPUTS_BYTES``): what is over the bound is computed by the float model, and the report is still the
    report with the cache off under the same bound."""
    model, npz = MODELS / "conv_bn_relu.onnx", _npz(tmp_path)
    per_sample = 1 * 10 * 4  # conv_bn_relu's output: logits [1, 10] float32
    monkeypatch.setattr(compile_module, "FLOAT_OUTPUTS_BYTES", 3 * per_sample)  # samples 0, 1, 2 only
    runs = count_float_runs(monkeypatch)
    bounded = compile_model(model, tmp_path / "a.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == [0, 4, 5, 6]  # sample 0: the check (no held-back sample kept); the fit samples past it
    assert bounded.report["validation"]["float_from_calibration"] == 2
    reset_stats_cache(0)
    runs.clear()
    off = compile_model(model, tmp_path / "b.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == [0, 4, 5, 6]
    assert _report(bounded) == _report(off)

    # the store's own bound: nothing kept, every fit sample recomputed, the report of the reuse turned off
    monkeypatch.setattr(compile_module, "FLOAT_OUTPUTS_BYTES", 64 << 20)
    monkeypatch.setattr(statcache, "OUTPUTS_MAX_BYTES", per_sample - 1)
    reset_stats_cache()
    runs.clear()
    over = compile_model(model, tmp_path / "c.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == FIT and stats_cache().samples_nbytes == 0
    monkeypatch.setattr(StatsCache, "sample_outputs", lambda *a, **k: {})
    reset_stats_cache()
    runs.clear()
    without = compile_model(model, tmp_path / "d.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == FIT
    assert _report(over) == _report(without)


def test_a_pass_that_does_not_keep_the_float_function_disables_the_reuse(tmp_path, monkeypatch):
    model, npz = MODELS / "conv_bn_relu.onnx", _npz(tmp_path)
    # a candidate's compile as the recipe runs it (the fit samples, outputs shared), then a final compile
    cand = CompileOptions(plan="default", calib=npz, calib_indices=tuple(FIT), validate=False,
                          share_float_outputs=True)
    compile_model(model, tmp_path / "cand.onnx", cand)
    assert stats_cache().samples_nbytes > 0
    runs = count_float_runs(monkeypatch)
    compile_model(model, tmp_path / "a.onnx", CompileOptions(plan="default", calib=npz))
    assert runs == [0]  # the check on sample 0 (no held-back reference here); the rest from calibration

    # fold-batchnorm declared as changing the function: the final compile takes no calibration output
    monkeypatch.setattr(fold_batchnorm.FoldBatchNormPass, "keeps_function", False)
    runs.clear()
    res = compile_model(model, tmp_path / "b.onnx", CompileOptions(plan="default", calib=npz))
    assert sorted(runs) == list(range(N)) and "float_from_calibration" not in res.report["validation"]
    # nor do the measured default's candidates keep any
    reset_stats_cache()
    runs.clear()
    compile_model(model, tmp_path / "c.onnx", CompileOptions(calib=npz))
    assert sorted(runs) == FIT and stats_cache().samples_nbytes == 0


def test_kept_outputs_go_to_their_own_sample_by_content_id(tmp_path):
    """The candidates' samples are the fit ones (a subset), the final compile's all N in file order: sample ``i``
    of the final collection gets exactly sample ``i``'s outputs, the ones it runs itself (the held-back) too."""
    graph = matmul_relu_graph()
    src = CalibrationSource.from_arg(str(npz_folder(tmp_path / "calib", N, 5)), input_signatures(graph))
    specs = {"h": QuantSpec(dtype="uint8"), "y": QuantSpec(dtype="uint8")}
    shared = FloatOutputs(64, 1 << 20, share=True)
    collect(graph, specs, src.subset(FIT), workers=2, outputs=shared)
    assert sorted(shared.values) == list(range(len(FIT)))  # positions among the fit samples
    cache = stats_cache()
    assert cache.samples_nbytes == len(FIT) * 2 * 4 * 4
    got = FloatOutputs(64, 1 << 20)
    collect(graph, specs, src, workers=2, outputs=got)
    assert cache.partial_hits == 1 and cache.sample_hits == len(FIT)
    assert sorted(got.values) == list(range(N))
    sess = ir.graph_session(graph, threads=1)
    for i, feed in enumerate(src):
        assert got.values[i]["y"].tobytes() == sess.run(["y"], feed)[0].tobytes()
    for j, i in enumerate(FIT):
        assert got.values[i]["y"] is shared.values[j]["y"]  # the candidate's very arrays, at their own places
    # another collection (other tensors run: another session) finds none of them
    other = FloatOutputs(64, 1 << 20)
    collect(graph, {"y": QuantSpec(dtype="uint8")}, src, workers=1, outputs=other)
    assert cache.sample_hits == len(FIT)


def test_the_sample_store_is_bounded_and_off_with_the_cache():
    one = {0: {"y": np.zeros(1024, np.float32)}}  # 4 KiB
    cache = reset_stats_cache()
    for sid in "abcd":
        cache.keep_sample_outputs("base", [sid], one, max_bytes=3 * 4096)
    cache.keep_sample_outputs("base", ["big"], {0: {"y": np.zeros(4096, np.float32)}}, max_bytes=3 * 4096)
    assert cache.samples_nbytes == 3 * 4096
    assert sorted(cache.sample_outputs("base", ["a", "b", "c", "d", "big"])) == [1, 2, 3]  # least recent gone
    assert cache.sample_outputs("other", ["b"]) == {}  # another session's collection
    assert sorted(cache.sample_outputs("base", ["b", "x", "d"], positions=[2])) == [2]
    off = reset_stats_cache(0)
    off.keep_sample_outputs("base", ["a"], one)
    assert off.sample_outputs("base", ["a"]) == {} and off.samples_nbytes == 0


def test_a_final_compile_that_calibrates_nothing_takes_another_sessions_outputs_on_the_same_graph(
        tmp_path, monkeypatch):
    """A weight-only winner's calibration runs nothing: its validation takes what a candidate's calibration on the
    same graph kept (another session: checked against the float model on one sample first)."""
    model, npz = MODELS / "conv_bn_relu.onnx", _npz(tmp_path)
    cand = CompileOptions(plan="default", calib=npz, calib_indices=tuple(FIT), validate=False,
                          share_float_outputs=True)
    compile_model(model, tmp_path / "cand.onnx", cand)
    runs = count_float_runs(monkeypatch)
    res = compile_model(model, tmp_path / "a.onnx", CompileOptions(preset="w4a16", calib=npz))
    assert res.report["calibration"]["tensors"] == 0  # nothing calibrated statically
    assert runs == [0, *HELD]  # the check on sample 0, and the samples no candidate ran
    assert res.report["validation"]["float_from_calibration"] == len(FIT) - 1
    monkeypatch.setattr(StatsCache, "sample_outputs", lambda *a, **k: {})
    runs.clear()
    plain = compile_model(model, tmp_path / "b.onnx", CompileOptions(preset="w4a16", calib=npz))
    assert sorted(runs) == list(range(N)) and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    a, b = res.validation, plain.validation
    assert a is not None and b is not None
    for x, y in zip(a.outputs, b.outputs, strict=True):  # float rounding of an equivalent graph at most
        assert abs(x.sqnr_db - y.sqnr_db) < 1e-3


def test_equal_outputs_of_two_sessions_on_one_graph_are_held_once_and_found_by_graph():
    cache = reset_stats_cache()
    y = np.arange(8, dtype=np.float32)
    cache.keep_sample_outputs("s1", ["a", "b"], {0: {"y": y}, 1: {"y": y + 1}}, graph="g")
    cache.keep_sample_outputs("s2", ["a"], {0: {"y": y.copy()}}, graph="g")  # equal values: the first's array
    assert cache.sample_outputs("s2", ["a"])[0]["y"] is y
    cache.keep_sample_outputs("s3", ["a"], {0: {"y": y + 2}}, graph="g")  # other values: its own
    assert cache.sample_outputs("s3", ["a"])[0]["y"].tobytes() == (y + 2).tobytes()
    # a collection with no entry of its own (or none at all) finds another session's on the same graph
    got = cache.sample_outputs("s9", ["a", "b", "c"], graph="g")
    assert sorted(got) == [0, 1] and got[1]["y"].tobytes() == (y + 1).tobytes()
    assert cache.sample_outputs(None, ["b"], graph="other") == {}
    assert sorted(cache.sample_outputs(None, ["a", "b"], graph="g")) == [0, 1]
