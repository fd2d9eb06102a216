"""Streamed validation (``--stream IN=OUT``): a recurrent model's error accumulates in the state it feeds back.

Validation on recorded states (each sample's state input as the data holds it: the float model's) measures one
step's error; a deployed stream feeds the quantized model its own state. Oracle: onnxruntime loops over both
models, each fed its own previous state, and numpy SQNR over the whole stream.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.plan.checks import parse_streams
from qcompiler.report import validate as qv

D, H, T = 8, 32, 24


def rnn_model() -> onnx.ModelProto:
    """x [1, D], h [1, H] -> z = x·Wx + h·Wh -> hn = tanh(z); y = hn·Wy [1, 4]: a recurrent cell."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((D, H)) * 0.5).astype(np.float32), "Wx"),
             numpy_helper.from_array((rng.standard_normal((H, H)) * 0.3).astype(np.float32), "Wh"),
             numpy_helper.from_array((rng.standard_normal((H, 4)) * 0.5).astype(np.float32), "Wy")]
    nodes = [helper.make_node("MatMul", ["x", "Wx"], ["a"], name="in"),
             helper.make_node("MatMul", ["h", "Wh"], ["b"], name="rec"),
             helper.make_node("Add", ["a", "b"], ["z"], name="sum"),
             helper.make_node("Tanh", ["z"], ["hn"], name="act"),
             helper.make_node("MatMul", ["hn", "Wy"], ["y"], name="out")]
    g = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D]),
                                         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                           helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, H])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _stream(model: Path | onnx.ModelProto, xs: np.ndarray, names: list[str] | None = None,
            states: list[np.ndarray] | None = None) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Run ``model`` over ``xs`` carrying its own state (or feeding ``states``); returns (feeds, outputs)."""
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    want = ["y", "hn"] + (names or [])
    h = np.zeros((1, H), np.float32)
    feeds, outs = [], []
    for t, x in enumerate(xs):
        feed = {"x": x, "h": h if states is None else states[t]}
        out = dict(zip(want, sess.run(want, feed)))
        feeds.append(feed)
        outs.append(out)
        h = out["hn"]
    return feeds, outs


def _sqnr(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    r = np.concatenate([a.reshape(-1) for a in ref]).astype(np.float64)
    g = np.concatenate([a.reshape(-1) for a in got]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum((r - g) ** 2)))


@pytest.fixture(scope="module")
def rnn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("rnn")
    src, out = d / "rnn.onnx", d / "rnn.q.onnx"
    onnx.save(rnn_model(), src)
    rng = np.random.default_rng(1)
    calib_feeds, _ = _stream(src, rng.standard_normal((32, 1, D)).astype(np.float32))
    np.savez(d / "calib.npz", x=np.stack([f["x"] for f in calib_feeds]), h=np.stack([f["h"] for f in calib_feeds]))
    compile_model(src, out, CompileOptions(plan=Plan.default(), calib=str(d / "calib.npz"), validate=False))
    xs = np.random.default_rng(2).standard_normal((T, 1, D)).astype(np.float32)
    feeds, _ = _stream(src, xs)  # the data as a float run recorded it: each sample's h is the float state
    return {"src": src, "out": out, "dir": d, "xs": xs, "feeds": feeds}


def test_streamed_validation_equals_the_streamed_oracle(rnn):
    src, out, xs, feeds = rnn["src"], rnn["out"], rnn["xs"], rnn["feeds"]
    _, f_out = _stream(ir.with_outputs(onnx.load(src), ["z"]), xs, ["z"])
    _, q_out = _stream(out, xs)
    rep = qv.validate(src, out, feeds, stream={"h": "hn"}, layer_names=["z"])
    got = {m.name: m.sqnr_db for m in rep.outputs}
    for n in ("y", "hn"):
        assert math.isclose(got[n], _sqnr([o[n] for o in f_out], [o[n] for o in q_out]), rel_tol=1e-9), n
    # per layer, on the same streamed inputs: the quantized model's z given its own previous state
    q_z = [o["z"] for o in _stream(ir.with_outputs(onnx.load(out), ["z"]), xs, ["z"])[1]]
    assert math.isclose(rep.layers[0].sqnr_db, _sqnr([o["z"] for o in f_out], q_z), rel_tol=1e-9)
    assert rep.stream == {"h": "hn"} and rep.to_json()["stream"] == {"h": "hn"}
    assert "streamed in order, each model fed its own previous hn as h" in rep.table()


def test_recorded_states_measure_one_step_only(rnn):
    """Without --stream each sample's h is the data's (the float state): the quantized model's error does not
    carry over, and the report equals the oracle fed the recorded states — higher than the streamed one."""
    src, out, xs, feeds = rnn["src"], rnn["out"], rnn["xs"], rnn["feeds"]
    _, f_out = _stream(src, xs)
    _, q_rec = _stream(out, xs, states=[f["h"] for f in feeds])
    _, q_own = _stream(out, xs)
    plain = {m.name: m.sqnr_db for m in qv.validate(src, out, feeds, per_layer=False).outputs}
    streamed = {m.name: m.sqnr_db for m in qv.validate(src, out, feeds, per_layer=False, stream={"h": "hn"}).outputs}
    assert math.isclose(plain["y"], _sqnr([o["y"] for o in f_out], [o["y"] for o in q_rec]), rel_tol=1e-9)
    assert streamed["y"] == pytest.approx(_sqnr([o["y"] for o in f_out], [o["y"] for o in q_own]), rel=1e-9)
    assert streamed["y"] < plain["y"] - 1.0  # measured: the state's error accumulates over 24 steps


def test_stream_from_the_cli_and_bad_pairs(rnn):
    d = rnn["dir"]
    np.savez(d / "val.npz", x=np.stack([f["x"] for f in rnn["feeds"]]), h=np.stack([f["h"] for f in rnn["feeds"]]))
    run = CliRunner().invoke
    res = run(cli, ["validate", str(rnn["src"]), str(rnn["out"]), "--data", str(d / "val.npz"), "--stream", "h=hn",
                    "--json", str(d / "v.json")])
    assert res.exit_code == 0, res.output
    assert "streamed in order" in res.output and json.loads((d / "v.json").read_text())["stream"] == {"h": "hn"}
    for pair, msg in (("q=hn", "--stream q=hn: no model input 'q'"), ("h=zz", "--stream h=zz: no graph output 'zz'"),
                      ("h", "--stream 'h': expected IN=OUT")):
        bad = run(cli, ["validate", str(rnn["src"]), str(rnn["out"]), "--data", str(d / "val.npz"), "--stream", pair])
        assert bad.exit_code == 2 and msg in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.output
    comp = run(cli, ["compile", str(rnn["src"]), "-o", str(d / "c.onnx"), "--calib", str(d / "calib.npz"), "--plan",
                     "default", "--validate-data", str(d / "val.npz"), "--stream", "h=hn", "--report",
                     str(d / "r.json"), "-q"])
    assert comp.exit_code == 0, comp.output
    assert json.loads((d / "r.json").read_text())["validation"]["stream"] == {"h": "hn"}


def test_parse_streams():
    assert parse_streams(["h=hn", " c = cn "]) == {"h": "hn", "c": "cn"}
    with pytest.raises(UserError, match="given twice"):
        parse_streams(["h=hn", "h=x"])


def _worst_slice_db(ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> float:
    """numpy: the lowest of each output's whole SQNR and its per-feature (axis 1) SQNRs over the samples given."""
    worst = math.inf
    for n in ("y", "hn"):
        r = np.concatenate([o[n] for o in ref]).astype(np.float64)
        g = np.concatenate([o[n] for o in got]).astype(np.float64)
        worst = min(worst, _sqnr([r], [g]))
        for j in range(r.shape[1]):
            if np.any(r[:, j]):
                worst = min(worst, _sqnr([r[:, j]], [g[:, j]]))
    return worst


def test_measured_default_scores_its_candidates_streamed(rnn):
    """With --stream the measured default scores each candidate as streamed validation would: the candidate
    (calibrated on the fit samples) runs the whole calibration stream on its own state and is scored at the
    held-back places. Oracle: the same plan compiled on the same samples, an onnxruntime loop, numpy SQNRs."""
    src, d = rnn["src"], rnn["dir"]
    data = np.load(d / "calib.npz")
    xs = data["x"]
    held = [i for i in range(len(xs)) if i % 4 == 3]  # 8 of 32: every 4th, the last of each run
    fit = tuple(i for i in range(len(xs)) if i not in held)
    scores = {}
    for stream in ({}, {"h": "hn"}):
        res = compile_model(src, d / "md.onnx", CompileOptions(plan="auto", calib=str(d / "calib.npz"),
                                                                validate=False, stream=stream))
        scores[bool(stream)] = {c["name"]: c["sqnr_db"] for c in res.report["recipe"]["candidates"]}
    cand = d / "cand.onnx"
    compile_model(src, cand, CompileOptions(plan=Plan.default(), calib=str(d / "calib.npz"), calib_indices=fit,
                                            validate=False))
    _, f_all = _stream(src, xs)
    _, q_own = _stream(cand, xs)
    _, q_rec = _stream(cand, xs, states=list(data["h"]))
    streamed = _worst_slice_db([f_all[i] for i in held], [q_own[i] for i in held])
    recorded = _worst_slice_db([f_all[i] for i in held], [q_rec[i] for i in held])
    assert scores[True]["default"] == pytest.approx(streamed, abs=1e-3)
    assert scores[False]["default"] == pytest.approx(recorded, abs=1e-3)
    assert streamed < recorded - 1.0  # measured: the candidate's own state drifts over the stream


def test_task_metric_reads_the_streamed_outputs(rnn):
    """With --stream, a task metric gets each candidate's streamed outputs at the held-back places and the float
    model's streamed ones (oracle: the same plan compiled on the fit samples, onnxruntime loops, numpy)."""
    src, d = rnn["src"], rnn["dir"]
    xs = np.load(d / "calib.npz")["x"]
    held = [i for i in range(len(xs)) if i % 4 == 3]
    fit = tuple(i for i in range(len(xs)) if i not in held)

    def neg_max_err(quantized, reference, feeds):
        return -max(float(np.max(np.abs(q["y"] - r["y"]))) for q, r in zip(quantized, reference, strict=True))

    res = compile_model(src, d / "mdm.onnx", CompileOptions(plan="auto", calib=str(d / "calib.npz"), validate=False,
                                                             stream={"h": "hn"}, task_metric=neg_max_err))
    got = {c["name"]: c["metric"] for c in res.report["recipe"]["candidates"]}
    cand = d / "cand_m.onnx"
    compile_model(src, cand, CompileOptions(plan=Plan.default(), calib=str(d / "calib.npz"), calib_indices=fit,
                                            validate=False))
    _, f_all = _stream(src, xs)
    _, q_own = _stream(cand, xs)
    _, q_rec = _stream(cand, xs, states=list(np.load(d / "calib.npz")["h"]))
    want = -max(float(np.max(np.abs(q_own[i]["y"] - f_all[i]["y"]))) for i in held)
    recorded = -max(float(np.max(np.abs(q_rec[i]["y"] - f_all[i]["y"]))) for i in held)
    assert got["default"] == pytest.approx(want, rel=1e-6) and want != pytest.approx(recorded, rel=1e-3)
