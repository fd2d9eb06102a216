"""The measured default's and the guard's held-back samples: a spread of the calibration data (every k-th), not its
last samples; candidates calibrate on exactly the other samples; the statistics cache serves the fit samples'
statistics to the all-sample compiles exactly; the w8a8-dynamic preset's guard (per-token scales, SmoothQuant)."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from _graphs import matmul_relu_graph
from click.testing import CliRunner

from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import CalibrationSource, collect, input_signatures, reset_stats_cache, stats_cache
from qcompiler.calib.stats import TensorStats
from qcompiler.cli import cli
from qcompiler.plan import Plan, QuantSpec, load_plan
from qcompiler.plan.ablations import guarded_algorithms
from qcompiler.recipe.candidates import dynamic_upgrades, without
from qcompiler.recipe.measure import held_back, held_indices

collect_module = importlib.import_module("qcompiler.calib.collect")
MODELS = Path(__file__).resolve().parents[1] / "models"


pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_held_back_indices_are_spread_over_the_data() -> None:
    assert held_indices(64) == list(range(3, 64, 4))  # 16 of 64: every 4th, the last of each run of 4
    assert held_indices(32) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert held_indices(10) == [4, 9]  # min(16, 10 // 4) = 2, every 5th
    assert held_indices(100) == list(range(5, 96, 6))  # 16 of 100: every 6th, none of the last 4
    assert held_indices(4) == [3] and held_indices(3) == []
    for n in range(4, 200):
        idx = held_indices(n)
        assert len(idx) == min(16, n // 4) and len(set(idx)) == len(idx) and idx[-1] < n and 0 not in idx


def _sorted_by_class(tmp: Path) -> tuple[Path, np.ndarray]:
    """gemm_head's 32 samples stored sorted by 'class': 24 of class A (the fixture's inputs), then 8 of class B
    (the same inputs, sign flipped and 4x larger: another activation range)."""
    x = np.load(MODELS / "gemm_head.npz")["input"]
    data = np.concatenate([x[:24], -4.0 * x[:8]]).astype(np.float32)
    path = tmp / "sorted.npz"
    np.savez(path, input=data)
    return path, data


def test_a_data_set_sorted_by_class_is_held_back_from_every_class(tmp_path: Path) -> None:
    npz, data = _sorted_by_class(tmp_path)
    model = MODELS / "gemm_head.onnx"
    fit, held = held_back(str(npz), model, None)
    # the last 8 (what was held back before) are all of class B: the score would only see class B inputs
    assert held_indices(32) == [3, 7, 11, 15, 19, 23, 27, 31]
    got = np.stack([f["input"] for f in held])
    assert np.array_equal(got, data[[3, 7, 11, 15, 19, 23, 27, 31]])
    assert (got[:6] == data[:24][[3, 7, 11, 15, 19, 23]]).all() and (got[6:] == data[24:][[3, 7]]).all()
    assert fit == tuple(i for i in range(32) if i % 4 != 3)


def test_candidates_calibrate_on_exactly_the_other_samples(tmp_path: Path) -> None:
    """A compile calibrated on the fit indices is byte-identical to one on a file holding only those samples, and
    the measured default's held-back score is onnxruntime's SQNR on the held-back samples of that compile."""
    npz, data = _sorted_by_class(tmp_path)
    model = MODELS / "gemm_head.onnx"
    fit, _ = held_back(str(npz), model, None)
    sub = tmp_path / "fit.npz"
    np.savez(sub, input=data[list(fit)])
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    compile_model(model, a, CompileOptions(plan="default", calib=str(npz), calib_indices=fit, validate=False))
    compile_model(model, b, CompileOptions(plan="default", calib=str(sub), validate=False))
    assert _digest(a) == _digest(b)
    # the measured default's 'default' candidate is that compile, scored on the held-back samples
    r = compile_model(model, tmp_path / "auto.onnx", CompileOptions(calib=str(npz), validate=False))
    rec = r.report["recipe"]
    assert rec["held_samples"] == 8
    fs, qs = ort.InferenceSession(str(model)), ort.InferenceSession(str(a))
    held = data[held_indices(32)]
    f = np.concatenate([fs.run(None, {"input": h})[0] for h in held]).astype(np.float64)
    q = np.concatenate([qs.run(None, {"input": h})[0] for h in held]).astype(np.float64)
    whole = 10 * np.log10(np.sum(f * f) / np.sum((f - q) ** 2))
    default = next(c for c in rec["candidates"] if c["name"] == "default")
    # the score is the worst slice (here along the 10 classes): at most the whole-output SQNR
    assert default["sqnr_db"] <= round(whole, 3) + 1e-3
    per_class = [10 * np.log10(np.sum(f[:, j] ** 2) / np.sum((f[:, j] - q[:, j]) ** 2)) for j in range(f.shape[1])]
    assert default["sqnr_db"] == pytest.approx(min(whole, *per_class), abs=2e-3)


def _fields(st: TensorStats) -> tuple:
    return (st.min, st.max, st.count, st.samples, st.zeros, st.nonfinite, st.range_exp, st.bins,
            None if st.hist is None else st.hist.tobytes())


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_cached_fit_samples_merge_with_the_held_back_ones_exactly(tmp_path: Path, monkeypatch, method: str) -> None:
    """The candidates collect on the fit samples (every 4th held back), the confirmation and the final compile on
    all N: only the held-back samples run, and the merged statistics equal one pass in file order field for field
    (min / max / counts are order-free; the histogram's power-of-two cells merge exactly)."""
    graph = matmul_relu_graph()
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(11)
    for i in range(12):  # ranges that grow late: the histogram range doubles within the held-back samples
        np.savez(folder / f"{i:03d}.npz", x=(rng.standard_normal((2, 6)) * (1 + 3 * (i % 4 == 3) * i)).astype(
            np.float32))
    src = CalibrationSource.from_arg(str(folder), input_signatures(graph))
    specs = {"h": QuantSpec(dtype="uint8", calibration=method), "y": QuantSpec(dtype="int8", calibration=method),
             "x": QuantSpec(dtype="int8", calibration=method)}
    reset_stats_cache(0)
    fresh = collect(graph, specs, src, workers=1, shapes={})
    reset_stats_cache()
    fit = [i for i in range(12) if i not in held_indices(12)]
    collect(graph, specs, src.subset(fit), workers=2, shapes={})
    ran: list[int] = []
    real = collect_module._run_samples
    monkeypatch.setattr(collect_module, "_run_samples", lambda sess, group, source, *a: ran.append(len(source))
                        or real(sess, group, source, *a))
    merged = collect(graph, specs, src, workers=2, shapes={})
    assert ran == [3] and stats_cache().partial_hits == 1
    assert {k: _fields(v) for k, v in merged.items()} == {k: _fields(v) for k, v in fresh.items()}
    assert all(merged[k].range(specs[k]) == fresh[k].range(specs[k]) for k in specs)
    # a part that does not start at the first sample is not served (the first-sample shapes are that sample's)
    reset_stats_cache()
    collect(graph, specs, src.subset(range(1, 12)), workers=1, shapes={})
    ran.clear()
    collect(graph, specs, src, workers=1, shapes={})
    assert ran == [12] and stats_cache().partial_hits == 0


def test_measured_default_with_and_without_the_cache_is_byte_identical(tmp_path: Path) -> None:
    npz, _ = _sorted_by_class(tmp_path)
    model = MODELS / "gemm_head.onnx"
    reset_stats_cache(0)
    off = tmp_path / "off.onnx"
    compile_model(model, off, CompileOptions(calib=str(npz), validate=False, effort="normal"))
    cache = reset_stats_cache()
    on = tmp_path / "on.onnx"
    compile_model(model, on, CompileOptions(calib=str(npz), validate=False, effort="normal"))
    assert cache.hits >= 1
    assert _digest(on) == _digest(off)


# ------------------------------------------------------------------------------------ w8a8-dynamic's guard
def test_per_token_scales_are_guarded_and_w8a8_dynamic_offers_them() -> None:
    plan = Plan.from_dict({"version": 1, "defaults": {"activation": {"dtype": "float"}}, "rules": [
        {"match": {"op_type": ["MatMul"]}, "activation": {"dtype": "uint8", "granularity": "per_token",
                                                          "symmetric": False, "calibration": "dynamic"}}],
        "algorithms": {"guard": "measure"}})
    assert guarded_algorithms(plan) == ["per_token"] and dynamic_upgrades(plan) == []
    off = without(plan, ["per_token"], "x").to_dict()
    assert [r["activation"]["granularity"] for r in off["rules"]] == ["per_tensor"] and "algorithms" not in off
    shipped = load_plan("w8a8-dynamic")
    assert shipped.guard == "measure" and guarded_algorithms(shipped) == []
    ups = dynamic_upgrades(shipped)
    assert [u.name for u in ups] == ["with-per_token", "with-per_token+smooth"]
    assert [r["activation"]["granularity"] for r in ups[0].plan.to_dict()["rules"]] == ["per_token"]
    assert "algorithms" not in ups[0].plan.to_dict()
    assert ups[1].plan.to_dict()["algorithms"] == {"smooth": {"alpha": "auto"}}
    assert dynamic_upgrades(load_plan("w8a8")) == []  # static activations: nothing to offer


def _preset_without_guard(tmp: Path) -> Path:
    text = (Path(__file__).resolve().parents[1] / "qcompiler/plan/presets/w8a8-dynamic.yaml").read_text()
    p = tmp / "plain-dynamic.yaml"
    p.write_text(text.split("algorithms:")[0])
    return p


def test_w8a8_dynamic_without_data_is_compiled_as_written(tmp_path: Path, caplog) -> None:
    model = MODELS / "transformer_block.onnx"
    before = _digest(model)
    out, rep = tmp_path / "d.onnx", tmp_path / "d.json"
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--preset", "w8a8-dynamic",
                                     "--report", str(rep), "--no-validate"])
    assert r.exit_code == 0, r.output
    assert "recipe" not in json.loads(rep.read_text())  # no data: the guard does not run
    assert "WARNING" not in r.output and not caplog.records
    ref = tmp_path / "ref.onnx"
    r = CliRunner().invoke(cli, ["compile", str(model), "-o", str(ref), "--plan", str(_preset_without_guard(
        tmp_path)), "--no-validate", "-q"])
    assert r.exit_code == 0, r.output
    assert _digest(out) == _digest(ref) and _digest(model) == before


def test_w8a8_dynamic_with_data_compiles_the_best_measured(tmp_path: Path) -> None:
    model, npz = MODELS / "transformer_block.onnx", MODELS / "transformer_block.npz"
    out, rep = tmp_path / "d.onnx", tmp_path / "d.json"
    r = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--preset", "w8a8-dynamic", "--calib",
                                 str(npz), "--report", str(rep), "--no-validate"])
    assert r.exit_code == 0, r.output
    rec = json.loads(rep.read_text())["recipe"]
    names = {c["name"]: c for c in rec["candidates"]}
    assert list(names) == ["as-written", "with-per_token", "with-per_token+smooth"]
    best = max(names.values(), key=lambda c: c["sqnr_db"])
    won = names[rec["winner"]]
    if best["sqnr_db"] > names["as-written"]["sqnr_db"] + 0.05:
        assert won is best and f"{best['name'].removeprefix('with-')} added" in r.output
    else:
        assert rec["winner"] == "as-written"
    # the file is that candidate's plan compiled on all the samples
    ups = {u.name: u.plan for u in dynamic_upgrades(load_plan("w8a8-dynamic"))}
    ref = tmp_path / "ref.onnx"
    compile_model(model, ref, CompileOptions(plan=ups[won["name"]] if won["name"] in ups else str(
        _preset_without_guard(tmp_path)), calib=str(npz), validate=False))
    assert _digest(out) == _digest(ref)


def test_w8a8_dynamic_on_a_model_without_matmul_measures_nothing(tmp_path: Path) -> None:
    model, npz = MODELS / "depthwise.onnx", MODELS / "depthwise.npz"  # Conv, BatchNormalization, Relu only
    out = tmp_path / "c.onnx"
    r = compile_model(model, out, CompileOptions(preset="w8a8-dynamic", calib=str(npz), validate=False))
    assert r.report["recipe"]["candidates"] == [] and r.report["recipe"]["reason"] == "nothing to guard"
    ref = tmp_path / "ref.onnx"
    compile_model(model, ref, CompileOptions(plan=str(_preset_without_guard(tmp_path)), calib=str(npz),
                                             validate=False))
    assert _digest(out) == _digest(ref)
