"""Validation's float reference from calibration's runs (issue 15: float activations captured once): the compile's
calibration keeps the float graph outputs of the first samples (qcompiler.calib.shared.FloatOutputs) and
validation uses them instead of running the float model on those samples again — only after sample 0's outputs
matched the float model's own run, only when the passes before calibrate keep the float function, never from a
statistics-cache hit; the compiled file is the same either way."""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import collect, input_signatures, reset_stats_cache
from qcompiler.calib.shared import FloatOutputs
from qcompiler.calib.sources import CalibrationSource
from qcompiler.plan import QuantSpec
from qcompiler.report import validate as qv
from qcompiler.report.validate.compare import REUSE_RTOL, _equivalent

compare_module = importlib.import_module("qcompiler.report.validate.compare")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"

pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _folder(tmp: Path, model: str, n: int = 12, seed: int = 0) -> Path:
    data = np.load(MODELS / f"{model}.npz")
    name = data.files[0]
    x = data[name]
    rng = np.random.default_rng(seed)
    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(tmp / f"{i:03d}.npz", **{name: (x[i % len(x)] + 0.05 * rng.standard_normal(x.shape[1:]))
                                          .astype(np.float32)})
    return tmp


def _feeds(folder: Path, model: Path) -> list[dict[str, np.ndarray]]:
    return list(qv.load_feeds(folder, ir.load_model(model)))


def _float_runs(model: Path, feeds: list[dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    sess = ir.session(ir.load_model(model), threads=1)
    names = [o.name for o in sess.get_outputs()]
    return {i: dict(zip(names, sess.run(names, f))) for i, f in enumerate(feeds)}


def _quantized(tmp: Path, model: Path, folder: Path) -> Path:
    out = tmp / "q.onnx"
    compile_model(model, out, CompileOptions(plan="default", calib=str(folder), validate=False))
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- validate
def test_given_float_outputs_give_the_same_report_and_skip_the_float_runs(tmp_path: Path, monkeypatch) -> None:
    model = MODELS / "transformer_block.onnx"
    folder = _folder(tmp_path / "calib", "transformer_block")
    q = _quantized(tmp_path, model, folder)
    feeds = _feeds(folder, model)
    plain = qv.validate(model, q, feeds)
    given = _float_runs(model, feeds)
    runs = {"float": 0}
    real = compare_module._run_checked

    def counting(runner, feed, sample, names, which, label):  # type: ignore[no-untyped-def]
        runs[which] = runs.get(which, 0) + 1
        return real(runner, feed, sample, names, which, label)

    monkeypatch.setattr(compare_module, "_run_checked", counting)
    reused = qv.validate(model, q, feeds, calib_outputs=given)
    assert reused.float_from_calibration == len(feeds) - 1
    assert runs["float"] == 1 and runs["quant"] == len(feeds)  # the float model ran sample 0 only
    a, b = plain.to_json(), reused.to_json()
    assert b.pop("float_from_calibration") == len(feeds) - 1 and "float_from_calibration" not in a
    assert a == b  # the float model's own outputs: the same numbers


def test_outputs_that_differ_on_sample_0_are_not_used(tmp_path: Path) -> None:
    model = MODELS / "transformer_block.onnx"
    folder = _folder(tmp_path / "calib", "transformer_block")
    q = _quantized(tmp_path, model, folder)
    feeds = _feeds(folder, model)
    plain = qv.validate(model, q, feeds).to_json()
    given = _float_runs(model, feeds)
    # another function (here: the outputs scaled by 1.001, as an fp16 or pruned graph would differ): not used,
    # though the later samples would have been "right"
    off = {i: {k: v * np.float32(1.001) if i == 0 else v for k, v in d.items()} for i, d in given.items()}
    rep = qv.validate(model, q, feeds, calib_outputs=off)
    assert rep.float_from_calibration == 0 and rep.to_json() == plain
    # a missing output, a wrong dtype: not used either
    assert not _equivalent({}, given[0], list(given[0]))
    assert not _equivalent({k: v.astype(np.float64) for k, v in given[0].items()}, given[0], list(given[0]))
    # float rounding of an equivalent graph is within the tolerance
    near = {k: v + np.float32(REUSE_RTOL / 10) * np.abs(v).max() for k, v in given[0].items()}
    assert _equivalent(near, given[0], list(given[0]))
    nan = {k: np.full_like(v, np.nan) for k, v in given[0].items()}
    assert not _equivalent(nan, nan, list(given[0]))


# ------------------------------------------------------------------------------------------------ calibration
def test_collect_keeps_the_graph_outputs_of_the_first_samples_with_the_same_statistics(tmp_path: Path) -> None:
    model = MODELS / "transformer_block.onnx"
    folder = _folder(tmp_path / "calib", "transformer_block", n=6)
    graph, _ = ir.import_graph(ir.load_model(model))
    src = CalibrationSource.from_arg(str(folder), input_signatures(graph))
    names = [t.name for t in graph.tensors().values() if t.inputs and t.name not in {o.name for o in graph.outputs}]
    specs = {n: QuantSpec(dtype="uint8") for n in names[:3]}
    plain = collect(graph, specs, src, workers=2)
    reset_stats_cache()
    keep = FloatOutputs(limit=4, max_bytes=1 << 20)
    kept = collect(graph, specs, src, workers=2, outputs=keep, shapes={})
    assert {k: (v.min, v.max, v.count) for k, v in kept.items()} == {k: (v.min, v.max, v.count)
                                                                      for k, v in plain.items()}
    assert sorted(keep.values) == [0, 1, 2, 3]  # the first `limit` samples, in order
    ref = _float_runs(model, list(src))
    for i, outs in keep.values.items():
        assert list(outs) == [o.name for o in graph.outputs]
        for k, v in outs.items():
            np.testing.assert_array_equal(v, ref[i][k])
    # a statistics-cache hit runs nothing: no outputs
    again = FloatOutputs(limit=4, max_bytes=1 << 20)
    collect(graph, specs, src, workers=2, outputs=again)
    assert again.values == {}
    # the byte cap: what fits is kept, in order, nothing after
    reset_stats_cache()
    one = sum(v.nbytes for v in ref[0].values())
    small = FloatOutputs(limit=6, max_bytes=2 * one)
    collect(graph, specs, src, workers=1, outputs=small)
    assert sorted(small.values) == [0, 1] and small.full


# ---------------------------------------------------------------------------------------------------- compile
def test_compile_validation_uses_calibration_outputs_same_file_same_numbers(tmp_path: Path) -> None:
    model = MODELS / "transformer_block.onnx"  # no BatchNormalization: calibration's graph computes the same
    folder = _folder(tmp_path / "calib", "transformer_block")
    rep = tmp_path / "r.json"
    res = compile_model(model, tmp_path / "a.onnx", CompileOptions(plan="default", calib=str(folder), report=str(rep)))
    val = json.loads(rep.read_text())["validation"]
    assert val["float_from_calibration"] == 11  # 12 samples: the float model ran sample 0
    # the same compile without validation writes the same file; validating it on its own gives the same numbers
    reset_stats_cache()
    compile_model(model, tmp_path / "b.onnx", CompileOptions(plan="default", calib=str(folder), validate=False))
    assert _sha(tmp_path / "a.onnx") == _sha(tmp_path / "b.onnx")
    alone = qv.validate(model, tmp_path / "a.onnx", _feeds(folder, model), layer_samples=8,
                        layer_bytes=2 << 30).to_json()
    assert res.validation is not None
    got = res.validation.to_json()
    got.pop("float_from_calibration")
    assert got["outputs"] == alone["outputs"] and got["worst_slice_sqnr_db"] == alone["worst_slice_sqnr_db"]

    # calibration served by the statistics cache (the same compile again in this process): the float model runs
    res2 = compile_model(model, tmp_path / "c.onnx", CompileOptions(plan="default", calib=str(folder)))
    assert res2.validation is not None and res2.validation.float_from_calibration == 0
    assert res2.validation.to_json()["outputs"] == got["outputs"]


def test_no_reuse_with_a_function_changing_pass_or_other_validation_data(tmp_path: Path) -> None:
    model = MODELS / "conv_bn_relu.onnx"
    folder = _folder(tmp_path / "calib", "conv_bn_relu")
    # equalize runs before calibrate: the float graph calibration runs is rescaled, not the model's
    plan = tmp_path / "cle.yaml"
    plan.write_text("version: 1\ndefaults:\n  weight: {dtype: int8, granularity: per_channel, symmetric: true}\n"
                    "  activation: {dtype: uint8, granularity: per_tensor, symmetric: false}\n"
                    "algorithms:\n  equalize: {ranges: activations}\n", encoding="utf-8")
    res = compile_model(model, tmp_path / "a.onnx", CompileOptions(plan=str(plan), calib=str(folder)))
    assert "equalize" in res.pipeline
    assert res.validation is not None and res.validation.float_from_calibration == 0
    reset_stats_cache()
    other = _folder(tmp_path / "other", "conv_bn_relu", seed=3)
    res = compile_model(model, tmp_path / "b.onnx", CompileOptions(plan="default", calib=str(folder),
                                                                  validate_data=str(other)))
    assert res.validation is not None and res.validation.float_from_calibration == 0
    reset_stats_cache()
    res = compile_model(model, tmp_path / "c.onnx", CompileOptions(plan="default", calib=str(folder)))
    assert res.validation is not None and res.validation.float_from_calibration == 11  # BN folded: within rtol
