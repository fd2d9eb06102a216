"""Compile speed (issue 15): the profile of a compile (``--profile``, the summary's top 3, ``report["profile"]``),
GPTQ's bounded Hessian rows (``max_rows``), progress of the long steps, and validation spread over workers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from _graphs import Builder, vi
from click.testing import CliRunner
from test_gptq import INT4_PC, _compile, conv_model, correlated, matmul_model, plan, smooth_maps

from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core import profile
from qcompiler.core.errors import UserError
from qcompiler.passes import _gptq_cache
from qcompiler.passes import gptq as gptq_mod
from qcompiler.report import validate as qv
from qcompiler.report.validate import compare


# ------------------------------------------------------------------------------------------------- profile
def test_profile_nests_steps_adds_repeats_and_shares(monkeypatch):
    prof = profile.Profile()
    with profile.step("nothing active"):  # no active profile: a no-op
        pass
    assert prof.root.children == []
    with prof.active():
        with profile.step("a"):
            with profile.step("inner"):
                pass
            with profile.step("inner"):
                pass
        prof.add("b", 2.0)
    prof.total = 4.0
    a, b = prof.root.children
    assert (a.name, b.name, b.seconds) == ("a", "b", 2.0)
    assert [c.name for c in a.children] == ["inner"] and a.children[0].calls == 2
    rows = dict((name, (sec, share)) for name, sec, share in prof.rows())
    assert rows["b"] == (2.0, 0.5) and "  inner" in rows and "(other)" in rows
    assert rows["(other)"][0] == pytest.approx(4.0 - 2.0 - a.seconds)
    assert prof.top(1) == [("b", 2.0, 0.5)]
    js = prof.to_json()
    assert js["seconds"] == 4.0 and js["steps"][0]["steps"][0] == {"step": "inner", "seconds": round(
        a.children[0].seconds, 4), "calls": 2}
    lines = prof.table().splitlines()
    assert lines[0].split() == ["step", "seconds", "share"] and lines[-1].split() == ["total", "4.000", "100.0%"]



@pytest.fixture(autouse=True)
def no_gptq_caches():
    """GPTQ does its work in every compile here (tests/test_gptq_cache.py tests the caches)."""
    _gptq_cache.reset_caches(0, 0)
    yield
    _gptq_cache.reset_caches()

def test_compile_profile_covers_every_step(tmp_path):
    calib = smooth_maps(8, seed=4)
    _, _out, res = _compile(tmp_path, conv_model(), calib, plan(INT4_PC), "q")
    names = [s.name for s in res.profile.root.children]
    for want in ("setup (passes, target, plan)", "load", "import graph", "calibration data", "pass cleanup",
                 "pass calibrate", "pass gptq", "pass insert-qdq", "pass lower", "export + write", "cost report",
                 "move into place"):
        assert want in names, (want, names)
    gptq = next(s for s in res.profile.root.children if s.name == "pass gptq")
    assert [c.name for c in gptq.children] == ["cache keys", "hessians", "sweep"]
    assert [c.name for c in gptq.children[1].children] == ["statistics"]  # the Conv reads the graph input: no run
    rep = res.report["profile"]
    assert [s["step"] for s in rep["steps"]] == names[:len(rep["steps"])]
    assert rep["seconds"] <= res.profile.finish() + 1e-9
    # a pass's own clock and its profile step agree (the step also holds its children)
    rec = next(r for r in res.records if r.name == "gptq")
    assert gptq.seconds >= rec.seconds


def test_cli_profile_table_summary_top3_and_report(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(conv_model(), model)
    np.savez(tmp_path / "calib.npz", x=smooth_maps(6, seed=1))
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    base = ["compile", str(model), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--report", str(rep)]
    r = CliRunner().invoke(cli, [*base, "--profile"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["step", "seconds", "share"]
    assert any(line.startswith("validation ") for line in lines) and any(line.startswith("total ") for line in lines)
    top = next(line for line in lines if line.startswith("time: "))
    assert top.count(" s (") == 3 and "(--profile" not in top
    steps = [s["step"] for s in json.loads(rep.read_text())["profile"]["steps"]]
    assert "validation" in steps and "pass calibrate" in steps
    first = out.read_bytes()
    r2 = CliRunner().invoke(cli, base)  # without --profile: no table, the top 3 still in the summary
    assert r2.exit_code == 0, r2.output
    assert not r2.output.startswith("step") and "(--profile: every step)" in r2.output
    assert out.read_bytes() == first  # profiling changes nothing written


# ------------------------------------------------------------------------------------------ gptq max_rows
def _conv_node():
    w = gs.Constant("w", np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32))
    return gs.Node("Conv", attrs={"pads": [0, 1, 2, 0], "strides": [2, 1], "dilations": [1, 2], "group": 2},
                   inputs=[gs.Variable("x"), w])


@pytest.mark.parametrize("quota", [1, 7, 59])
def test_im2col_pick_equals_rows_of_the_full_unfolding(quota):
    x = np.random.default_rng(1).standard_normal((2, 8, 9, 11)).astype(np.float32)
    full = gptq_mod._im2col(_conv_node(), x, 2)
    pick = gptq_mod._Pick(quota, (0, 3, 1))
    idx = pick(full.shape[1])
    assert idx is not None and len(idx) == quota and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(gptq_mod._im2col(_conv_node(), x, 2, pick), full[:, idx])
    assert gptq_mod._Pick(full.shape[1], (0, 0, 0))(full.shape[1]) is None  # enough room: every row


def test_max_rows_zero_and_large_are_today_s_codes_small_is_deterministic(tmp_path):
    calib = correlated(16, (16, 64), 1, seed=1)  # 16 samples x 16 tokens = 256 rows
    outs = {}
    for tag, opts in [("default", True), ("zero", {"max_rows": 0}), ("large", {"max_rows": 256}),
                      ("small", {"max_rows": 64}), ("small2", {"max_rows": 64})]:
        _, out, res = _compile(tmp_path, matmul_model(), calib, plan(INT4_PC, gptq=opts), tag)
        outs[tag] = (out.read_bytes(), res.report["gptq"])
    assert outs["zero"][0] == outs["default"][0] == outs["large"][0]  # every row: the codes of before
    assert outs["small"][0] == outs["small2"][0]  # fixed seed: the same rows every time
    assert outs["small"][0] != outs["default"][0]  # 4 of 16 tokens per sample: other codes
    assert outs["small"][1]["samples"] == 16


def test_max_rows_counts_the_rows_the_hessian_saw(tmp_path, monkeypatch):
    seen = []
    real = gptq_mod.GPTQPass._quantize

    def spy(self, job):
        seen.append(job.rows)
        return real(self, job)

    monkeypatch.setattr(gptq_mod.GPTQPass, "_quantize", spy)
    calib = smooth_maps(8, seed=4)  # 8 samples x 6*10 positions
    _compile(tmp_path, conv_model(), calib, plan(INT4_PC, gptq={"max_rows": 100}), "q")
    assert seen == [8 * 13]  # ceil(100 / 8) = 13 positions per sample
    seen.clear()
    _compile(tmp_path, conv_model(), calib, plan(INT4_PC, gptq=True), "all")
    assert seen == [8 * 60]


def test_max_rows_negative_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="option 'max-rows': must be >= 0"):
        _compile(tmp_path, matmul_model(), correlated(4, (4, 64), 1, seed=1), plan(INT4_PC, gptq={"max_rows": -1}),
                 "q")


# ------------------------------------------------------------------------------------------------ progress
def test_gptq_reports_progress_by_sample_and_by_layer(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(), src)
    np.savez(tmp_path / "calib.npz", x=smooth_maps(5, seed=2))
    events: list[tuple[str, int, int]] = []

    compile_model(src, tmp_path / "q.onnx", CompileOptions(plan=plan(INT4_PC), calib=str(tmp_path / "calib.npz")),
                  progress=lambda stage, d, t: events.append((stage, d, t)))
    assert [e for e in events if e[0] == "gptq hessians"] == [("gptq hessians", i, 5) for i in range(1, 6)]
    assert [e for e in events if e[0] == "gptq layers"] == [("gptq layers", 1, 1)]
    val = [e for e in events if e[0] == "validate" and e[1] > 0]
    assert val == [("validate", i, 5) for i in range(1, 6)]


# ---------------------------------------------------------------------------------------------- validation
def _two_layer_model() -> onnx.ModelProto:
    b = Builder(5)
    b.node("MatMul", ["x", b.init("w1", b.randn(32, 32, scale=0.3))], ["h"], name="mm1")
    b.node("Relu", ["h"], ["r"], name="relu")
    b.node("MatMul", ["r", b.init("w2", b.randn(32, 8, scale=0.3))], ["y"], name="mm2")
    return b.model([vi("x", ["N", 32])], [vi("y", ["N", 8])])


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_validation_workers_give_the_same_metrics(tmp_path, monkeypatch, workers):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((10, 4, 32)).astype(np.float32))
    src = tmp_path / "m.onnx"
    onnx.save(_two_layer_model(), src)

    compile_model(src, tmp_path / "q.onnx", CompileOptions(calib=str(tmp_path / "calib.npz"), validate=False))
    feeds = [{"x": f} for f in rng.standard_normal((9, 4, 32)).astype(np.float32)]
    monkeypatch.setenv(compare.WORKERS_ENV, "1")
    ref = qv.validate(src, tmp_path / "q.onnx", feeds, layer_samples=4).to_json()
    monkeypatch.setenv(compare.WORKERS_ENV, workers)
    done: list[tuple[int, int]] = []
    got = qv.validate(src, tmp_path / "q.onnx", feeds, layer_samples=4,
                      progress=lambda d, t: done.append((d, t))).to_json()
    assert got == ref
    assert ref["layer_samples"] == 4 and len(ref["layers"]) >= 2
    assert done == [(i, 9) for i in range(1, 10)]


def test_validation_workers_env_is_read(monkeypatch):
    monkeypatch.setenv(compare.WORKERS_ENV, "3")
    assert compare.validation_workers() == 3
    monkeypatch.setenv(compare.WORKERS_ENV, "x")
    assert 1 <= compare.validation_workers() <= 2


def test_import_seconds_go_to_the_first_compile_only(monkeypatch):
    monkeypatch.setattr(profile, "IMPORT_STARTED", 10.0)
    monkeypatch.setattr(profile, "_IMPORT_DONE", 12.5)
    assert profile.import_seconds() == 2.5
    assert profile.import_seconds() is None
