"""``calibration: auto``: the calibrate pass chooses the activation calibration method per model, measured on
held-out calibration samples, and the compile then equals a compile with that method given by hand."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.plan import AUTO_CALIBRATIONS, Plan

MODELS = Path(__file__).resolve().parent.parent / "models"
CBR = MODELS / "conv_bn_relu.onnx"


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", MODELS / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _plan(method: str) -> Plan:
    return Plan.from_dict({"version": 1, "defaults": {
        "weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
        "activation": {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False, "calibration": method}},
        "rules": []})


def _compile(tmp: Path, name: str, method: str, calib: str, **kw) -> tuple[Path, dict]:
    out = tmp / f"{name}.onnx"
    res = compile_model(CBR, out, CompileOptions(plan=_plan(method), calib=calib, validate=False, **kw))
    return out, res.report


def _sqnr(model: Path, x: np.ndarray) -> float:
    ref = ir.session(CBR).run(None, {"input": x})[0].astype(np.float64)
    got = ir.session(model).run(None, {"input": x})[0].astype(np.float64)
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2)))


def _data(tmp: Path, spike: float | None) -> str:
    x = np.load(MODELS / "conv_bn_relu.npz")["input"].copy()  # [32, 1, 3, 32, 32]
    if spike is not None:
        x[3, :, :, :2, :2] *= spike  # 12 input values far outside the rest: minmax ranges stretch to fit them
    path = tmp / f"calib_{spike}.npz"
    np.savez(path, input=x)
    return str(path)


@pytest.mark.parametrize("spike", [None, 50.0])
def test_auto_compiles_exactly_as_the_method_it_measured_best(spike, tmp_path):
    calib = _data(tmp_path, spike)
    out, rep = _compile(tmp_path, "auto", "auto", calib)
    auto = rep["calibration"]["auto"]
    scores = auto["output_sqnr_db"]
    assert set(scores) == set(AUTO_CALIBRATIONS) and auto["samples"] == 8  # min(16, 32 // 4) held out
    assert auto["method"] == max(AUTO_CALIBRATIONS, key=lambda m: (scores[m], -AUTO_CALIBRATIONS.index(m)))
    assert rep["calibration"]["methods"] == {auto["method"]: auto["tensors"]}
    # the held-out statistics are merged back: the same ranges, the same file, as that method by hand
    by_hand, _ = _compile(tmp_path, "by_hand", auto["method"], calib)
    assert out.read_bytes() == by_hand.read_bytes()
    if spike is not None:
        # a few extreme values ruin minmax's resolution for everything else; the held-out samples say so
        assert auto["method"] != "minmax" and scores[auto["method"]] >= scores["minmax"] + 6.0
        # and on new images from the fixture's own generator (other seed), the compile is better for it
        mf = _make_fixtures()
        fresh = mf.imagenet_normalize(mf.smooth_images(np.random.default_rng(11), 4, 32, 32)).astype(np.float32)
        mm, _ = _compile(tmp_path, "minmax", "minmax", calib)
        for x in fresh:
            x = x.reshape(1, 3, 32, 32)
            assert _sqnr(out, x) >= _sqnr(mm, x) + 3.0


def test_auto_without_data_to_measure_on_is_minmax(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="qcompiler.passes.calibrate"):
        _, rep = _compile(tmp_path, "random", "auto", "random")
    assert rep["calibration"]["auto"]["method"] == "minmax" and rep["calibration"]["synthetic"]
    assert "calibration auto: no calibration data to measure the methods on (synthetic ranges)" in caplog.text
    three = tmp_path / "three.npz"
    np.savez(three, input=np.load(MODELS / "conv_bn_relu.npz")["input"][:3])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcompiler.passes.calibrate"):
        out, rep = _compile(tmp_path, "three", "auto", str(three))
    assert rep["calibration"]["auto"] == {"method": "minmax", "output_sqnr_db": {}, "samples": 0, "tensors": 6}
    assert "3 sample(s): too few to hold any out" in caplog.text
    mm, _ = _compile(tmp_path, "three_mm", "minmax", str(three))
    assert out.read_bytes() == mm.read_bytes()


def test_pipeline_option_and_held_out_count(tmp_path):
    calib = _data(tmp_path, None)
    pipeline = ("cleanup,fold-batchnorm,fold-scale,fold-bias,fuse-activations,cleanup,resolve-plan,"
                "calibrate{method=auto,auto-samples=4},insert-qdq,lower")
    out = tmp_path / "p.onnx"
    res = compile_model(CBR, out, CompileOptions(calib=calib, validate=False, pipeline=pipeline))
    auto = res.report["calibration"]["auto"]
    assert auto["samples"] == 4 and auto["method"] in AUTO_CALIBRATIONS
    calib_rec = next(r for r in res.records if r.name == "calibrate")
    assert calib_rec.stats[f"auto_{auto['method']}"] == 6 and calib_rec.stats["samples"] == 32


def test_bad_auto_samples_is_a_user_error(tmp_path):
    from qcompiler.core.errors import UserError

    with pytest.raises(UserError, match="auto-samples"):
        compile_model(CBR, tmp_path / "x.onnx", CompileOptions(
            calib="random", validate=False,
            pipeline="cleanup,resolve-plan,calibrate{method=auto,auto-samples=0},insert-qdq,lower"))


def test_auto_warns_when_gptq_runs_after_it(tmp_path, caplog):
    """auto measures the insert-qdq model of each method's ranges, not what GPTQ builds on them: it says so."""
    calib = _data(tmp_path, None)
    plan = Plan.from_dict({"version": 1, "defaults": {"activation": {"calibration": "auto"}}, "rules": [],
                           "algorithms": {"gptq": True}})
    with caplog.at_level(logging.WARNING, logger="qcompiler.passes.calibrate"):
        res = compile_model(CBR, tmp_path / "g.onnx", CompileOptions(plan=plan, calib=calib, validate=False))
    assert res.report["calibration"]["auto"]["measured_without"] == ["gptq"]
    assert "measured without gptq" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qcompiler.passes.calibrate"):
        res = compile_model(CBR, tmp_path / "a.onnx", CompileOptions(plan=_plan("auto"), calib=calib,
                                                                     validate=False))
    assert "measured_without" not in res.report["calibration"]["auto"] and "measured without" not in caplog.text
