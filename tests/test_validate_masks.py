"""Probability maps: the thresholded-mask agreement validation reports for Sigmoid outputs, and the ``iou`` check.

A text detector's map ``[N, 1, H, W]`` is used thresholded (PP-OCR det at 0.3): what a user sees is which
positions cross the level, not the SQNR of the probabilities, and top-k over its last axis (a spatial one) means
nothing. Oracles: numpy on onnxruntime's outputs of the float and the quantized model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.plan.checks import parse_check, parse_plan_checks, plan_checks_to_dict
from qcompiler.report import validate as qv
from qcompiler.report.validate.slices import _MaskAccumulator


def seg_model(rank2: bool = False) -> onnx.ModelProto:
    """x [N, 3, 16, 16] -> Conv 3x3 -> ReLU -> Conv 1x1 (one channel, bias -1) -> Sigmoid: a probability map
    [N, 1, 16, 16] with a few positions above 0.5 and many near it; ``rank2``: a multi-label head [N, 6]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((1, 8, 1, 1)) * 0.5).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1.0], np.float32), "b2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu")]
    if rank2:
        inits[1] = numpy_helper.from_array((rng.standard_normal((6, 8)) * 0.5).astype(np.float32), "w2")
        inits[2] = numpy_helper.from_array(np.full(6, -1.0, np.float32), "b2")
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
                  helper.make_node("Flatten", ["g"], ["f"], name="flat"),
                  helper.make_node("Gemm", ["f", "w2", "b2"], ["z"], name="head", transB=1)]
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])
    else:
        nodes.append(helper.make_node("Conv", ["r", "w2", "b2"], ["z"], name="c2"))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 16, 16])
    nodes.append(helper.make_node("Sigmoid", ["z"], ["y"], name="sig"))
    g = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.stack([s.run(["y"], f)[0] for f in feeds])


def _iou(f: np.ndarray, q: np.ndarray, level: float) -> tuple[float, float]:
    a, b = f > level, q > level
    union = np.count_nonzero(a | b)
    return (np.count_nonzero(a & b) / union if union else 1.0), float(np.mean(a == b))


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("seg")
    src, out = d / "seg.onnx", d / "seg.q.onnx"
    onnx.save(seg_model(), src)
    np.savez(d / "calib.npz", x=np.concatenate([f["x"] for f in _feeds(16, 1)])[:, None])
    compile_model(src, out, CompileOptions(plan=Plan.default(), calib=str(d / "calib.npz"), validate=False))
    return {"src": src, "out": out, "dir": d}


def test_mask_accumulator_equals_numpy_over_samples():
    rng = np.random.default_rng(3)
    f = rng.uniform(0, 1, (5, 1, 8, 8))
    q = np.clip(f + rng.normal(0, 0.08, f.shape), 0, 1)
    for level in (0.3, 0.5, 0.9):
        acc = _MaskAccumulator(level)
        for a, b in zip(f, q):
            acc.update(a, b)
        r = acc.result()
        assert r is not None
        iou, agree = _iou(f, q, level)
        assert r.iou == iou and r.agreement == agree and r.positives == float(np.mean(f > level))
    empty = _MaskAccumulator(0.5)
    empty.update(np.zeros((2, 2)), np.zeros((2, 2)))
    assert empty.result().iou == 1.0  # type: ignore[union-attr]


def test_sigmoid_map_reports_its_mask_not_topk(seg):
    feeds = _feeds(12, 7)
    rep = qv.validate(seg["src"], seg["out"], feeds, per_layer=False)
    m = rep.outputs[0]
    assert m.topk is None  # the last axis of [N, 1, H, W] is spatial: no top-k over it
    f, q = _run(seg["src"], feeds), _run(seg["out"], feeds)
    iou, agree = _iou(f, q, 0.5)
    assert 0.0 < float(np.mean(f > 0.5)) < 0.6  # positives and negatives both present
    assert m.mask is not None and m.mask.level == 0.5
    assert m.mask.iou == pytest.approx(iou, abs=1e-12) and m.mask.agreement == pytest.approx(agree, abs=1e-12)
    assert m.mask.iou < 1.0  # quantization moves some decisions: the measure can fail
    js = rep.to_json()["outputs"][0]["mask"]
    assert js["level"] == 0.5 and js["iou"] == pytest.approx(iou, abs=1e-6)
    assert "mask > 0.5: IoU" in rep.table() and "top-1" not in rep.table().split("per output:")[1]


def test_iou_check_gates_on_the_measured_value(seg):
    feeds = _feeds(12, 7)
    f, q = _run(seg["src"], feeds), _run(seg["out"], feeds)
    iou3, _ = _iou(f, q, 0.3)
    ok = parse_check(f"y iou@0.3>={iou3 - 1e-6:.9f}")
    bad = parse_check(f"y iou@0.3>={min(iou3 + 1e-3, 1.0):.9f}")
    rep = qv.validate(seg["src"], seg["out"], feeds, per_layer=False, checks=[ok, bad])
    (r_ok, r_bad) = rep.checks
    assert r_ok.value == pytest.approx(iou3, abs=1e-12) and r_ok.passed
    assert not r_bad.passed and not rep.passed
    assert "check y iou@0.3>=" in rep.failure()
    # the slice form: the first 8 rows of the map only
    part = parse_check("y[..., :8, :] iou@0.3>=0")
    rp = qv.validate(seg["src"], seg["out"], feeds, per_layer=False, checks=[part]).checks[0]
    assert rp.value == pytest.approx(_iou(f[..., :8, :], q[..., :8, :], 0.3)[0], abs=1e-12)


def test_iou_check_from_the_cli_exits_2_and_names_it(seg):
    d = seg["dir"]
    feeds = _feeds(8, 7)
    np.savez(d / "val.npz", x=np.concatenate([f["x"] for f in feeds])[:, None])
    res = CliRunner().invoke(cli, ["compile", str(seg["src"]), "-o", str(d / "gated.onnx"), "--calib",
                                   str(d / "calib.npz"), "--plan", "default", "--validate-data", str(d / "val.npz"),
                                   "--check", "y iou@0.3>=1.01"])
    assert res.exit_code == 2, res.output
    assert "check y iou@0.3>=1.01 failed" in res.output and not (d / "gated.onnx").exists()


def test_rank2_sigmoid_keeps_topk_and_gets_a_mask(tmp_path):
    src, out = tmp_path / "ml.onnx", tmp_path / "ml.q.onnx"
    onnx.save(seg_model(rank2=True), src)
    np.savez(tmp_path / "calib.npz", x=np.concatenate([f["x"] for f in _feeds(16, 1)])[:, None])
    compile_model(src, out, CompileOptions(plan=Plan.default(), calib=str(tmp_path / "calib.npz"), validate=False))
    m = qv.validate(src, out, _feeds(8, 5), per_layer=False).outputs[0]
    assert m.topk is not None and m.mask is not None


def test_check_parsing_of_iou():
    c = parse_check("map[..., 1:] iou@0.3>=0.9")
    assert (c.metric, c.level, c.threshold, c.slice_text) == ("iou", 0.3, 0.9, "..., 1:")
    assert c.describe() == "map[..., 1:] iou@0.3>=0.9" and parse_check("map iou>=0.8").level == 0.5
    for text, msg in (("map cos@0.3>=0.9", "'@LEVEL' goes with the iou metric only"),
                      ("map iou<=0.9", "iou takes '>='"),
                      ("map jaccard>=0.9", "unknown metric 'jaccard'")):
        with pytest.raises(UserError, match=msg):
            parse_check(text)
    checks = parse_plan_checks([{"output": "map", "min_iou": 0.9, "iou_level": 0.3},
                                {"output": "map", "slice": "..., 1:", "min_iou": 0.5, "min_sqnr_db": 20}], "p.yaml")
    assert [(c.metric, c.level, c.threshold) for c in checks] == [("iou", 0.3, 0.9), ("sqnr", 0.5, 20.0),
                                                                    ("iou", 0.5, 0.5)]
    assert plan_checks_to_dict(checks[:1]) == [{"output": "map", "min_iou": 0.9, "iou_level": 0.3}]
    again = parse_plan_checks(plan_checks_to_dict(checks), "again")
    assert [(c.output, c.slice_text, c.metric, c.level, c.threshold) for c in again] == [
        (c.output, c.slice_text, c.metric, c.level, c.threshold) for c in checks]
    for entry, msg in (({"output": "map", "iou_level": 0.3, "min_sqnr_db": 3}, r"iou_level: goes with min_iou"),
                       ({"output": "map", "min_iou": 0.9, "iou_level": "x"}, r"iou_level: expected a number")):
        with pytest.raises(UserError, match=msg):
            parse_plan_checks([entry], "p.yaml")
