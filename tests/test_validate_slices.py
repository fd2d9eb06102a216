"""Validation that sees what users see: the worst slice of each output, top-k agreement, ``--check`` and the
plan's ``checks:``, and the ``--min-sqnr`` gate on the worst slice (issue 14, part 4).

The central fixture is a YOLO-like detector head: one output ``output0`` [1, 10, 64] concatenating 4 box
coordinates (0-320) and 6 class probabilities (0-1) along axis 1. Its "quantized" twin quantizes that output per
tensor (uint8, scale 320/255), as a per-tensor activation scale sized for the box coordinates would: the boxes
keep ~48 dB while the probabilities are wrecked; the whole-tensor SQNR hides it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.plan.checks import parse_check, parse_slice, parse_slice_axes
from qcompiler.report import validate as qv
from qcompiler.report.validate.slices import (
    _SliceAccumulator,
    _TopKAccumulator,
    default_slice_axis,
    looks_like_probabilities,
    stable_rank,
)

F32 = TensorProto.FLOAT
OPSET = [helper.make_opsetid("", 17)]
SAMPLES = 12
BOX_SCALE = 320.0


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _finish(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializer=inits), opset_imports=OPSET)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def detector(quantize_output: bool = False) -> onnx.ModelProto:
    """x [N, 64, 8] -> boxes 320*Sigmoid(x@Wb) [N, 64, 4] ++ scores Sigmoid(x@Ws) [N, 64, 6] -> output0
    [N, 10, 64]; with ``quantize_output`` the output goes through uint8 Q/DQ with one scale (320/255)."""
    rng = np.random.default_rng(0)
    wb = rng.normal(0, 0.5, (8, 4)).astype(np.float32)
    ws = rng.normal(0, 0.5, (8, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(wb, "Wb"), numpy_helper.from_array(ws, "Ws"),
             numpy_helper.from_array(np.array(BOX_SCALE, np.float32), "box_scale")]
    nodes = [helper.make_node("MatMul", ["x", "Wb"], ["b0"], name="mm_box"),
             helper.make_node("Sigmoid", ["b0"], ["b1"], name="sig_box"),
             helper.make_node("Mul", ["b1", "box_scale"], ["boxes"], name="scale_box"),
             helper.make_node("MatMul", ["x", "Ws"], ["s0"], name="mm_cls"),
             helper.make_node("Sigmoid", ["s0"], ["scores"], name="sig_cls"),
             helper.make_node("Concat", ["boxes", "scores"], ["cat"], name="concat", axis=-1)]
    out = "t" if quantize_output else "output0"
    nodes.append(helper.make_node("Transpose", ["cat"], [out], name="transpose", perm=[0, 2, 1]))
    if quantize_output:
        inits += [numpy_helper.from_array(np.array(BOX_SCALE / 255, np.float32), "q_scale"),
                  numpy_helper.from_array(np.array(0, np.uint8), "q_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["t", "q_scale", "q_zp"], ["tq"], name="q"),
                  helper.make_node("DequantizeLinear", ["tq", "q_scale", "q_zp"], ["output0"], name="dq")]
    return _finish(nodes, [helper.make_tensor_value_info("x", F32, ["N", 64, 8])],
                   [helper.make_tensor_value_info("output0", F32, ["N", 10, 64])], inits)


def classifier(quantize_output: bool = False) -> onnx.ModelProto:
    """x [N, 16] -> Softmax(x@W) [N, 12] ("probs"); with ``quantize_output`` the probabilities go through uint8
    Q/DQ with scale 1/50 (the probabilities are close to 1/12: ties flip some top-1s)."""
    w = np.random.default_rng(1).normal(0, 0.1, (16, 12)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W")]
    out = "p" if quantize_output else "probs"
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm"),
             helper.make_node("Softmax", ["logits"], [out], name="softmax", axis=-1)]
    if quantize_output:
        inits += [numpy_helper.from_array(np.array(1 / 50, np.float32), "q_scale"),
                  numpy_helper.from_array(np.array(0, np.uint8), "q_zp")]
        nodes += [helper.make_node("QuantizeLinear", ["p", "q_scale", "q_zp"], ["pq"], name="q"),
                  helper.make_node("DequantizeLinear", ["pq", "q_scale", "q_zp"], ["probs"], name="dq")]
    return _finish(nodes, [helper.make_tensor_value_info("x", F32, ["N", 16])],
                   [helper.make_tensor_value_info("probs", F32, ["N", 12])], inits)


def _feeds(shape: tuple[int, ...], seed: int = 2, n: int = SAMPLES) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1.5, shape).astype(np.float32)} for _ in range(n)]


def _outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = ir.session(model)
    return np.concatenate([sess.run(None, f)[0] for f in feeds]).astype(np.float64)


def _sqnr(ref: np.ndarray, q: np.ndarray) -> float:
    return 10 * math.log10(float(np.sum(ref * ref)) / float(np.sum((ref - q) ** 2)))


@pytest.fixture(scope="module")
def det_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("det")
    onnx.save(detector(), str(d / "float.onnx"))
    onnx.save(detector(True), str(d / "quant.onnx"))
    x = np.stack([f["x"] for f in _feeds((1, 64, 8))])
    np.savez(d / "data.npz", x=x)
    return {"float": d / "float.onnx", "quant": d / "quant.onnx", "data": d / "data.npz"}


# ------------------------------------------------------------------------------------------- the slice metrics
def test_worst_slice_finds_the_probabilities_numpy_oracle():
    feeds = _feeds((1, 64, 8))
    fm, qm = detector(), detector(True)
    rep = qv.validate(fm, qm, feeds, per_layer=False)
    ref, got = _outputs(fm, feeds), _outputs(qm, feeds)
    (m,) = rep.outputs
    # whole tensor: looks fine (box coordinates dominate)
    assert m.sqnr_db == pytest.approx(_sqnr(ref, got), rel=1e-9)
    assert m.sqnr_db > 35.0
    # per channel (axis 1) oracle on the full arrays
    per = [_sqnr(ref[:, c], got[:, c]) for c in range(10)]
    worst = int(np.argmin(per))
    assert worst >= 4  # a class-score channel
    ws = m.worst_slice
    assert (ws.axis, ws.index, ws.slices) == (1, worst, 10)
    assert ws.sqnr_db == pytest.approx(per[worst], rel=1e-9)
    assert ws.sqnr_db < 10.0  # the probabilities are wrecked
    assert ws.max_abs == pytest.approx(float(np.max(np.abs(ref[:, worst] - got[:, worst]))), rel=1e-12)
    assert rep.worst_slice_sqnr() == pytest.approx(per[worst], rel=1e-9)
    assert rep.worst_output_sqnr() == pytest.approx(m.sqnr_db)
    j = rep.to_json()
    assert j["outputs"][0]["sqnr_db"] == pytest.approx(m.sqnr_db, abs=1e-3)
    assert j["outputs"][0]["worst_slice"]["index"] == worst
    assert j["worst_slice_sqnr_db"] == pytest.approx(per[worst], abs=1e-3)
    assert f"worst slice {worst} of axis 1 (10 slices)" in rep.table()


def test_streaming_equals_one_shot():
    feeds = _feeds((1, 64, 8))
    fm, qm = detector(), detector(True)
    one = qv.validate(fm, qm, [{"x": np.concatenate([f["x"] for f in feeds])}], per_layer=False)
    many = qv.validate(fm, qm, iter(feeds), per_layer=False)  # a generator: consumed one sample at a time
    a, b = one.outputs[0].worst_slice, many.outputs[0].worst_slice
    assert (a.index, a.slices) == (b.index, b.slices)
    assert a.sqnr_db == pytest.approx(b.sqnr_db, rel=1e-9) and a.max_abs == b.max_abs
    # the accumulator keeps arrays of the axis' length, whatever the number of samples
    rng = np.random.default_rng(3)
    ref, q = rng.normal(size=(40, 7, 5)), rng.normal(size=(40, 7, 5))
    acc = _SliceAccumulator(1)
    for i in range(40):
        acc.update(ref[i:i + 1], q[i:i + 1])
    assert acc.ref2 is not None and acc.ref2.shape == (7,) and acc.noise2.shape == (7,)
    whole = _SliceAccumulator(1)
    whole.update(ref, q)
    m1, m2 = acc.metrics(), whole.metrics()
    assert m1 is not None and m2 is not None and m1.index == m2.index
    assert m1.sqnr_db == pytest.approx(m2.sqnr_db, rel=1e-12)


def test_silent_slice_left_out_of_the_ranking():
    ref = np.zeros((3, 4))
    ref[:, 1:] = np.arange(9).reshape(3, 3) + 1.0
    q = ref + 0.01
    acc = _SliceAccumulator(1)
    acc.update(ref, q)
    m = acc.metrics()
    assert m is not None and m.silent == 1 and m.index != 0 and math.isfinite(m.sqnr_db)


def test_default_slice_axis_rule():
    assert default_slice_axis(()) is None
    assert default_slice_axis((7,)) == 0
    assert default_slice_axis((8, 1000)) == 1  # [N, F]
    assert default_slice_axis((1, 84, 8400)) == 1  # [N, C, A] detector head
    assert default_slice_axis((1, 8400, 84)) == 2  # [N, A, C]
    assert default_slice_axis((1, 16, 32, 32)) == 1  # [N, C, H, W]


def test_slice_axis_override_and_errors():
    feeds = _feeds((1, 64, 8), n=3)
    fm, qm = detector(), detector(True)
    rep = qv.validate(fm, qm, feeds, per_layer=False, slice_axes={"output0": -1})
    assert rep.outputs[0].worst_slice.axis == 2 and rep.outputs[0].worst_slice.slices == 64
    with pytest.raises(UserError, match=r"--slice-axis output0=3: output 'output0' has rank 3"):
        qv.validate(fm, qm, feeds, per_layer=False, slice_axes={"output0": 3})
    with pytest.raises(UserError, match=r"--slice-axis nope=\.\.\.: no graph output 'nope'"):
        qv.validate(fm, qm, feeds, per_layer=False, slice_axes={"nope": 1})
    assert parse_slice_axes(["output0=2", "a=b=-1"]) == {"output0": 2, "a=b": -1}
    with pytest.raises(UserError, match=r"--slice-axis 'output0': expected OUTPUT=AXIS"):
        parse_slice_axes(["output0"])


# ------------------------------------------------------------------------------------------------ top-k
def _topk_oracle(ref: np.ndarray, q: np.ndarray, k: int) -> float:
    top = np.argmax(ref, axis=-1)
    order = np.argsort(-q, axis=-1, kind="stable")[..., :k]
    return float(np.mean(np.any(order == top[..., None], axis=-1)))


def test_topk_agreement_numpy_oracle():
    feeds = _feeds((4, 16), seed=5)
    fm, qm = classifier(), classifier(True)
    rep = qv.validate(fm, qm, feeds, per_layer=False)
    ref, got = _outputs(fm, feeds), _outputs(qm, feeds)
    topk = rep.outputs[0].topk
    assert topk is not None and set(topk) == {1, 5}
    assert topk[1] == pytest.approx(_topk_oracle(ref, got, 1), abs=1e-12)
    assert topk[5] == pytest.approx(_topk_oracle(ref, got, 5), abs=1e-12)
    assert (topk[1], topk[5]) == (42 / 48, 1.0)  # measured: ties of the coarse probabilities flip 6 of 48 top-1s
    assert topk[1] == pytest.approx(rep.outputs[0].top1_agreement)
    assert rep.to_json()["outputs"][0]["topk_agreement"]["5"] == pytest.approx(topk[5], abs=1e-6)
    # the detector's output0 is no probability tensor: no top-k
    det = qv.validate(detector(), detector(True), _feeds((1, 64, 8), n=2), per_layer=False)
    assert det.outputs[0].topk is None


def test_topk_detected_from_values_and_small_class_axis():
    acc = _TopKAccumulator(3)
    assert acc.ks == [1]
    rng = np.random.default_rng(6)
    ref = rng.random((20, 3))
    q = ref + rng.normal(0, 0.2, ref.shape)
    acc.update(ref, q)
    assert acc.result() == {1: pytest.approx(_topk_oracle(ref, q, 1))}
    p = rng.random((5, 4))
    assert looks_like_probabilities(p / p.sum(-1, keepdims=True))
    assert not looks_like_probabilities(p)


def test_stable_rank_is_the_position_in_a_stable_argsort():
    """Top-k counts the float top-1's rank in the quantized scores without sorting them: the same position as
    ``np.argsort(-q, kind="stable")`` gives, ties (``-0.0 == 0.0``), infinities and NaNs included."""
    rng = np.random.default_rng(11)
    for _ in range(2000):
        shape = (*rng.integers(1, 4, size=rng.integers(0, 3)), int(rng.integers(1, 12)))
        q = rng.integers(-3, 3, size=shape).astype(np.float32)
        u = rng.random(shape)
        q[u < 0.1] = np.nan
        q[(u >= 0.1) & (u < 0.15)] = -0.0
        q[(u >= 0.15) & (u < 0.2)] = np.inf
        q[(u >= 0.2) & (u < 0.25)] = -np.inf
        idx = rng.integers(0, shape[-1], size=(*shape[:-1], 1))
        v = -q.astype(np.float64)
        order = np.argsort(v, axis=-1, kind="stable")
        want = np.argmax(order == idx, axis=-1)
        np.testing.assert_array_equal(stable_rank(v, idx), want)


# ------------------------------------------------------------------------------------------------ checks
def test_check_parser():
    c = parse_check("output0[..., 4:]>=20dB")
    assert (c.output, c.slice_text, c.index, c.metric, c.threshold) == ("output0", "..., 4:",
                                                                        (Ellipsis, slice(4, None, None)), "sqnr", 20.0)
    assert parse_check("probs cos>=0.999").metric == "cos"
    assert parse_check("probs[0, 1:3] maxerr<=0.05").index == (0, slice(1, 3, None))
    assert parse_check("probs top1>=99%").threshold == 99.0
    assert parse_slice(":, ::2", "w") == (slice(None), slice(None, None, 2))
    for bad, part in [("x[", "unbalanced"), ("x[..., a:]>=20dB", "bad slice bound 'a'"),
                      ("x>=20", None), ("x maxerr>=1", "maxerr takes '<='"), ("x cos>=1dB", "does not fit"),
                      ("x[::0]>=3dB", "step cannot be zero"), ("x foo>=1", "unknown metric 'foo'"),
                      ("x[1]", "cannot parse")]:
        if part is None:
            assert parse_check(bad).metric == "sqnr"
            continue
        with pytest.raises(UserError, match="^--check " + repr(bad).replace("[", r"\[").replace(".", r"\.")
                           .replace("*", r"\*") + ": .*" + part.replace("[", r"\[").replace(".", r"\.")):
            parse_check(bad)


def test_check_metrics_equal_numpy_oracle():
    feeds = _feeds((1, 64, 8))
    fm, qm = detector(), detector(True)
    checks = [parse_check("output0[:, 4:]>=20dB"), parse_check("output0[:, :4]>=20dB"),
              parse_check("output0[:, 4:] maxerr<=0.05"), parse_check("output0[:, 4:] cos>=0.9"),
              parse_check("output0[0, 4:, :] top1>=99")]
    rep = qv.validate(fm, qm, feeds, per_layer=False, checks=checks)
    ref, got = _outputs(fm, feeds), _outputs(qm, feeds)
    sr, sq = ref[:, 4:], got[:, 4:]
    r = {c.check.describe(): c for c in rep.checks}
    assert r["output0[:, 4:] sqnr>=20"].value == pytest.approx(_sqnr(sr, sq), rel=1e-9)
    assert not r["output0[:, 4:] sqnr>=20"].passed
    assert r["output0[:, :4] sqnr>=20"].value == pytest.approx(_sqnr(ref[:, :4], got[:, :4]), rel=1e-9)
    assert r["output0[:, :4] sqnr>=20"].passed
    assert r["output0[:, 4:] maxerr<=0.05"].value == pytest.approx(float(np.max(np.abs(sr - sq))))
    cos = float(np.sum(sr * sq) / math.sqrt(np.sum(sr * sr) * np.sum(sq * sq)))
    assert r["output0[:, 4:] cos>=0.9"].value == pytest.approx(cos, rel=1e-9)
    # top1 over the last axis of each sample's [4:, :] slice (per sample: batch 1 -> index 0 of each run)
    t1 = float(np.mean(np.argmax(sr, axis=-1) == np.argmax(sq, axis=-1))) * 100
    assert r["output0[0, 4:, :] top1>=99"].value == pytest.approx(t1)
    assert not rep.passed and rep.verdict == "FAIL"
    assert "check output0[:, 4:] sqnr>=20 failed" in rep.failure()
    j = rep.to_json()
    assert j["passed"] is False and len(j["checks"]) == 5 and j["checks"][0]["passed"] is False


def test_check_naming_missing_output_or_bad_slice():
    feeds = _feeds((1, 64, 8), n=2)
    with pytest.raises(UserError, match=r"^--check 'nope>=3dB': no graph output 'nope' \(outputs: output0\)$"):
        qv.validate(detector(), detector(True), feeds, per_layer=False, checks=[parse_check("nope>=3dB")])
    with pytest.raises(UserError, match=r"^--check 'output0\[0, 0, 0, 0\]>=3dB': slice \[0, 0, 0, 0\] does not fit"):
        qv.validate(detector(), detector(True), feeds, per_layer=False,
                    checks=[parse_check("output0[0, 0, 0, 0]>=3dB")])
    with pytest.raises(UserError, match=r"slice \[:, 20:\] of output 'output0' \(shape \[1, 10, 64\]\) is empty"):
        qv.validate(detector(), detector(True), feeds, per_layer=False, checks=[parse_check("output0[:, 20:]>=3dB")])


# --------------------------------------------------------------------------------------------- the gates
def test_min_sqnr_gates_on_the_worst_slice():
    feeds = _feeds((1, 64, 8), n=4)
    rep = qv.validate(detector(), detector(True), feeds, per_layer=False, min_sqnr_db=20)
    m = rep.outputs[0]
    assert m.sqnr_db > 20 > m.worst_slice.sqnr_db  # the old gate passed this model
    assert not rep.passed and rep.verdict == "FAIL"
    assert rep.failure().startswith(f"output 'output0' (slice {m.worst_slice.index} of axis 1) SQNR ")
    assert rep.to_json()["worst_output_sqnr_db"] > 20 > rep.to_json()["worst_slice_sqnr_db"]


def test_cli_validate_check_and_gate(det_files, tmp_path):
    f, q, data = det_files["float"], det_files["quant"], det_files["data"]
    before = {p: p.read_bytes() for p in (f, q, data)}
    rj = tmp_path / "v.json"
    res = run("validate", f, q, "--data", data, "--json", rj, "--check", "output0[:, :4]>=30dB")
    assert res.exit_code == 0, res.output
    assert "pass: output0[:, :4] sqnr>=30" in res.stdout and "PASS:" in res.stdout
    res = run("validate", f, q, "--data", data, "--check", "output0[..., 4:, :]>=20dB")
    assert res.exit_code == 2 and "FAIL: output0[..., 4:, :] sqnr>=20" in res.stdout
    assert res.stderr.startswith("error: check output0[..., 4:, :] sqnr>=20 failed (--check 'output0[..., 4:, :]>=20dB')")
    v = json.loads(rj.read_text())
    res = run("validate", f, q, "--data", data, "--min-sqnr", 20)
    assert v["worst_output_sqnr_db"] > 20 > v["worst_slice_sqnr_db"]
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: output 'output0' (slice ")
    res = run("validate", f, q, "--data", data, "--check", "x[")
    assert res.exit_code == 2 and res.stderr.strip() == ("error: --check 'x[': unbalanced '[' / ']' (expected "
                                                         "OUTPUT[SLICE]>=20dB)")
    res = run("validate", f, q, "--data", data, "--slice-axis", "output0=2")
    assert res.exit_code == 0 and "of axis 2 (64 slices)" in res.stdout
    assert {p: p.read_bytes() for p in (f, q, data)} == before


def _compile_args(det_files: dict[str, Path], out: Path, *extra: Any) -> list[Any]:
    plan = [] if "--plan" in extra else ["--plan", "default"]
    return ["compile", det_files["float"], "-o", out, "--calib", det_files["data"], "-q", *plan, *extra]


def test_compile_check_refuses_and_writes_rejected_report(det_files, tmp_path):
    before = {p: p.read_bytes() for p in det_files.values()}
    ok = tmp_path / "ok" / "q.onnx"
    ok.parent.mkdir()
    rj = tmp_path / "ok.json"
    res = run(*_compile_args(det_files, ok, "--report", rj, "--check", "output0[:, 4:] maxerr<=1"))
    assert res.exit_code == 0, res.output
    rep = json.loads(rj.read_text())["validation"]
    assert rep["checks"][0]["passed"] is True and rep["checks"][0]["check"] == "output0[:, 4:] maxerr<=1"
    whole, slice_ = rep["worst_output_sqnr_db"], rep["worst_slice_sqnr_db"]
    assert slice_ <= whole
    bad = tmp_path / "bad"
    bad.mkdir()
    res = run(*_compile_args(det_files, bad / "q.onnx", "--check", "output0[:, 4:]>=200dB"))
    assert res.exit_code == 2
    rejected = bad / "q.rejected.report.json"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: validation: check output0[:, 4:] sqnr>=200 failed "
                                                   "(--check 'output0[:, 4:]>=200dB')")
    assert lines[0].endswith(f"no model written, the validation report is in {rejected}")
    assert sorted(bad.iterdir()) == [rejected]
    assert json.loads(rejected.read_text())["rejected"].startswith("a validation check failed")
    # --min-sqnr between the two (measured: whole 45.92 dB, worst slice 44.48 dB): the worst slice refuses what
    # the whole-tensor SQNR alone passed
    assert slice_ < whole - 0.2
    mid = round((whole + slice_) / 2, 2)
    res = run(*_compile_args(det_files, bad / "q2.onnx", "--min-sqnr", mid))
    assert res.exit_code == 2 and f"SQNR {slice_:.2f} dB is below --min-sqnr {mid} dB" in res.stderr
    assert not (bad / "q2.onnx").exists()
    res = run(*_compile_args(det_files, bad / "q3.onnx", "--check", "x["))
    assert res.exit_code == 2 and res.stderr.strip().startswith("error: --check 'x[': unbalanced")
    assert not (bad / "q3.onnx").exists()
    assert {p: p.read_bytes() for p in det_files.values()} == before


def test_plan_checks_section(det_files, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nchecks:\n  - {output: output0, slice: '..., 4:, :', min_sqnr_db: 200}\n")
    p = Plan.from_file(plan)
    assert [c.describe() for c in p.checks] == ["output0[..., 4:, :] sqnr>=200"]
    assert p.to_dict()["checks"] == [{"output": "output0", "slice": "..., 4:, :", "min_sqnr_db": 200.0}]
    assert "checks" not in Plan.default().to_dict()  # plans without checks serialize as before
    out = tmp_path / "q.onnx"
    res = run(*_compile_args(det_files, out, "--plan", plan))
    assert res.exit_code == 2 and f"({plan}: checks[0])" in res.stderr
    assert not out.exists() and (tmp_path / "q.rejected.report.json").is_file()
    # the API takes parsed checks too
    with pytest.raises(UserError, match=r"check output0 cos>=1\.1 failed"):
        compile_model(det_files["float"], tmp_path / "q4.onnx",
                      CompileOptions(calib=str(det_files["data"]), checks=[parse_check("output0 cos>=1.1")]))
    for text, msg in [("checks: {output: o}", "'checks' must be a list"),
                      ("checks: [{output: o}]", r"checks\[0\]: no threshold"),
                      ("checks: [{slice: '1', min_sqnr_db: 3}]", r"checks\[0\]: 'output'"),
                      ("checks: [{output: o, slice: 'a:', min_sqnr_db: 3}]", r"checks\[0\]\.slice: bad slice bound"),
                      ("checks: [{output: o, min_sqnr: 3}]", r"checks\[0\]: unknown key 'min_sqnr'")]:
        with pytest.raises(UserError, match=msg):
            Plan.from_text("version: 1\n" + text, source="p.yaml")


def test_package_records_checks(det_files, tmp_path):
    out = tmp_path / "bundle"
    res = run("package", det_files["float"], "-o", out, "--calib", det_files["data"], "-q",
              "--check", "output0[:, :4]>=20dB")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    checks = manifest["validation"]["checks"]
    assert [(c["check"], c["passed"]) for c in checks] == [("output0[:, :4] sqnr>=20", True)]
    assert manifest["validation"]["passed"] is True
    assert "worst_slice_sqnr_db" in manifest["validation"]
    page = (out / "validation.html").read_text()
    assert "<code>output0[:, :4] sqnr&gt;=20</code>" in page and "of axis 1: " in page
    # `verify` reruns the recorded checks in the full validation
    res = run("verify", out, "--model", det_files["float"], "--data", det_files["data"])
    assert res.exit_code == 0, res.output
    assert "pass: output0[:, :4] sqnr>=20" in res.stdout
    manifest["validation"]["checks"][0]["check"] = "output0[:, :4]>=200dB"
    (out / "manifest.json").write_text(json.dumps(manifest))
    res = run("verify", out, "--model", det_files["float"], "--data", det_files["data"])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith(f"error: {out}: full validation: check output0[:, :4] sqnr>=200 failed "
                                         f"({out}/manifest.json: validation.checks[0])")
    manifest["validation"]["checks"][0]["check"] = "output0[:"
    (out / "manifest.json").write_text(json.dumps(manifest))
    res = run("verify", out)
    assert res.exit_code == 2 and "'validation.checks[0].check': --check 'output0[:': unbalanced" in res.stderr


# ------------------------------------------------------------------------ silent classes (PROB_FLOOR)
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_class_that_never_fires_is_silent_but_a_rare_one_is_ranked():
    """A 6-way softmax: class 5 never above 1e-5 (its relative error huge: the worst SQNR of all), class 4
    above the floor on one sample only. As class scores, class 5 is left out and class 4 ranked; as plain
    features (``classes=False``), or for logits (negative values), nothing is left out."""
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1, (40, 6))
    z[:, 5] -= 30.0          # p ~ 1e-13: never fires
    z[:, 4] -= 12.0          # p ~ 1e-5 ...
    z[7, 4] += 12.0          # ... but on sample 7 a real candidate
    ref = _softmax(z)
    assert ref[:, 5].max() < qv.slices.PROB_FLOOR <= ref[:, 4].max()
    q = ref * (1 + rng.normal(0, 1e-3, ref.shape))
    q[:, 5] = ref[:, 5] * 3.0  # 300 % off on a class nobody sees: -6 dB
    brute = [10 * math.log10(np.sum(ref[:, c] ** 2) / np.sum((ref[:, c] - q[:, c]) ** 2)) for c in range(6)]
    assert int(np.argmin(brute)) == 5
    acc = _SliceAccumulator(1, classes=True)
    for i in range(0, 40, 8):
        acc.update(ref[i:i + 8], q[i:i + 8])
    m = acc.metrics()
    assert m is not None and m.silent == 1
    ranked = [c for c in range(6) if c != 5]
    want = min(ranked, key=lambda c: brute[c])
    assert m.index == want and m.sqnr_db == pytest.approx(brute[want], abs=1e-9)
    plain = _SliceAccumulator(1)
    plain.update(ref, q)
    pm = plain.metrics()
    assert pm is not None and pm.index == 5 and pm.silent == 0
    logits = _SliceAccumulator(1, classes=True)  # log-probabilities: values below 0, no floor
    logits.update(np.log(ref), np.log(np.abs(q)))
    lm = logits.metrics()
    assert lm is not None and lm.silent == 0


def test_validate_leaves_never_predicted_classes_out_of_the_worst_slice(tmp_path: Path):
    """End to end: a Softmax classifier [N, 8] whose classes 6, 7 never fire; the 'quantized' twin scales
    their logits (as a coarse per-tensor scale would round a tiny probability), the rest stays close. The
    report ranks classes 0-5 only, counts 2 silent, and the printed line says so."""
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (4, 8)).astype(np.float32)
    b = np.zeros(8, np.float32)
    b[6:] = -40.0
    dw = rng.normal(0, 1e-3, w.shape).astype(np.float32)

    def model(shift: float, noise: float) -> onnx.ModelProto:
        bb = b.copy()
        bb[6:] += shift
        ww = w + noise * dw
        nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["zb"]),
                 helper.make_node("Softmax", ["zb"], ["p"], axis=-1)]
        return _finish(nodes, [helper.make_tensor_value_info("x", F32, [None, 4])],
                       [helper.make_tensor_value_info("p", F32, [None, 8])],
                       [numpy_helper.from_array(ww, "w"), numpy_helper.from_array(bb, "b")])

    feeds = [{"x": rng.normal(0, 1, (2, 4)).astype(np.float32)} for _ in range(6)]
    fm, qm = model(0.0, 0.0), model(1.5, 1.0)
    rep = qv.validate(fm, qm, feeds, per_layer=False)
    ws = rep.outputs[0].worst_slice
    # the oracle: per-class SQNR from onnxruntime's outputs, by numpy
    fs, qs = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (fm, qm))
    f = np.concatenate([fs.run(None, d)[0] for d in feeds])
    q = np.concatenate([qs.run(None, d)[0] for d in feeds])
    per = [10 * math.log10(np.sum(f[:, c].astype(np.float64) ** 2) / np.sum((f[:, c] - q[:, c]).astype(np.float64) ** 2))
           for c in range(8)]
    assert f[:, 6:].max() < 1e-12 and min(per[6:]) < 0 < min(per[:6])  # the never-fired classes: worst by far
    assert ws is not None and ws.silent == 2 and ws.index == int(np.argmin(per[:6]))
    assert ws.sqnr_db == pytest.approx(min(per[:6]), abs=0.01)
    assert "(8 slices, 2 silent left out)" in rep.table()
