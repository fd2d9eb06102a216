"""``--freeze-input NAME=VALUE`` (the ``freeze-inputs`` pass) and cleanup's inlining of constant-condition ``If``s.

Oracle: onnxruntime on the unmodified float model fed the frozen value.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.cli import cli
from qcompiler.passes.cleanup import CleanupPass
from qcompiler.passes.freeze_inputs import FreezeInputsPass

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realdata
from test_subgraphs import _silero_stream, silero_if_model, sqnr, walk

D = 16


def mode_model(shared_output: bool = False) -> onnx.ModelProto:
    """x [1, D], mode (int64 scalar) -> If(mode == 1): then MatMul(x, W1) -> Relu; else MatMul(x, W2).
    ``shared_output``: the taken branch returns its result twice (the second If output gets an Identity copy)
    and a copy of the outer-scope ``x`` as a third output."""
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array((rng.standard_normal((D, D)) / 4).astype(np.float32), n) for n in ("W1", "W2")]
    t_nodes = [helper.make_node("MatMul", ["x", "W1"], ["p"], name="then_mm"),
               helper.make_node("Relu", ["p"], ["r"], name="then_relu")]
    e_nodes = [helper.make_node("MatMul", ["x", "W2"], ["e"], name="else_mm")]
    t_out = [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, D])]
    e_out = [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, D])]
    if shared_output:
        t_nodes.append(helper.make_node("Identity", ["x"], ["xt"], name="then_x"))
        e_nodes.append(helper.make_node("Identity", ["x"], ["xe"], name="else_x"))
        t_out += [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, D]),
                  helper.make_tensor_value_info("xt", TensorProto.FLOAT, [1, D])]
        e_out += [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, D]),
                  helper.make_tensor_value_info("xe", TensorProto.FLOAT, [1, D])]
    then_g = helper.make_graph(t_nodes, "then", [], t_out)
    else_g = helper.make_graph(e_nodes, "else", [], e_out)
    outs = ["y"] + (["y2", "y3"] if shared_output else [])
    nodes = [helper.make_node("Constant", [], ["one"], name="one", value=numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("Equal", ["mode", "one"], ["c"], name="eq"),
             helper.make_node("If", ["c"], outs, name="branch", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "mode", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D]),
                                          helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, D]) for o in outs], w)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def assert_branches_stay_float(src: Path, tmp_path: Path) -> None:
    """Compiled as given (no flag), the layers inside the If stay float: no DequantizeLinear anywhere."""
    plain = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "plain.onnx"), "--calib",
                                     str(tmp_path / "calib.npz"), "--plan", "default", "-q"])
    assert plain.exit_code == 0, plain.output
    assert "DequantizeLinear" not in [n.op_type for _, n in walk(onnx.load(tmp_path / "plain.onnx").graph)]


def assert_compile_refused(src: Path, tmp_path: Path, args: list[str], msg: str) -> None:
    """``compile SRC ARGS`` exits 2 with ``msg`` on one stderr line, no traceback, nothing written."""
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", "random",
                                   "--plan", "default", *args])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and msg in err[0] and "Traceback" not in res.output
    assert not (tmp_path / "q.onnx").exists()


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)


def _feed(seed: int, mode: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, D)).astype(np.float32),
            "mode": np.array(mode, np.int64)}


@pytest.mark.parametrize("mode", [1, 0])
@pytest.mark.parametrize("shared", [False, True])
def test_frozen_if_is_inlined_and_exact(mode, shared):
    model = mode_model(shared)
    graph, meta = ir.import_graph(model)
    fr = FreezeInputsPass(inputs=(f"mode={mode}",)).run_graph(graph)
    assert fr.modified and fr.stats["frozen"] == 1 and fr.stats["readers"] == 1
    res = CleanupPass().run_graph(graph)
    assert res.stats["inlined_ifs"] == 1
    out = ir.export_model(graph, meta)
    onnx.checker.check_model(out, full_check=True)
    assert "If" not in [n.op_type for n in out.graph.node]
    assert [i.name for i in out.graph.input] == ["x", "mode"] and [o.name for o in out.graph.output] == [
        o.name for o in model.graph.output]
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for seed in range(3):
        feed = _feed(seed, mode)
        got = _run(out, feed)
        if shared:  # numpy: onnxruntime itself returns zeros for an If output listed twice by its branch
            y = np.maximum(feed["x"] @ w["W1"], 0) if mode == 1 else feed["x"] @ w["W2"]
            np.testing.assert_allclose(got[0], y, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(got[1], got[0])
            np.testing.assert_array_equal(got[2], feed["x"])
        else:
            for a, b in zip(_run(model, feed), got, strict=True):
                np.testing.assert_array_equal(a, b)
    # idempotent: nothing reads the input any more
    again = FreezeInputsPass(inputs=(f"mode={mode}",)).run_graph(graph)
    assert again.modified is False and CleanupPass().run_graph(graph).stats.get("inlined_ifs", 0) == 0


def test_no_freeze_no_inlining():
    graph, _ = ir.import_graph(mode_model())
    assert "inlined_ifs" not in CleanupPass().run_graph(graph).stats
    assert [n.op for n in graph.nodes].count("If") == 1


def test_compile_quantizes_the_taken_branch(tmp_path):
    src = tmp_path / "mode.onnx"
    onnx.save(mode_model(), src)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, D)).astype(np.float32),
             mode=np.ones(16, np.int64))
    run = CliRunner().invoke
    assert_branches_stay_float(src, tmp_path)
    res = run(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"),
                    "--plan", "default", "--freeze-input", "mode=1", "--report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    q = onnx.load(tmp_path / "q.onnx")
    ops = [n.op_type for n in q.graph.node]
    assert "If" not in ops and "MatMul" in ops and ops.count("DequantizeLinear") >= 2
    assert [i.name for i in q.graph.input] == ["x", "mode"]
    assert "freeze-inputs{inputs=mode=1}" in res.output
    feeds = [_feed(s) for s in range(8)]
    ref = np.concatenate([_run(src, f)[0] for f in feeds])
    got = np.concatenate([_run(tmp_path / "q.onnx", f)[0] for f in feeds])
    assert sqnr(ref, got) >= 30.0  # measured ~40 dB: int8 weights and activations on one MatMul


@pytest.mark.parametrize("args,msg", [
    (["--freeze-input", "nope=1"], "--freeze-input nope=1: the model has no graph input 'nope' (inputs: x, mode)"),
    (["--freeze-input", "mode=1.5"], "--freeze-input mode=1.5: input 'mode' is int64: give an integer"),
    (["--freeze-input", "mode"], "--freeze-input 'mode': expected NAME=VALUE"),
    (["--freeze-input", "x=1"], "--freeze-input x=1: the input's shape"),
    (["--freeze-input", "mode=1", "--freeze-input", "mode=0"], "input 'mode' given twice"),
])
def test_bad_freeze_is_one_line_exit_2(tmp_path, args, msg):
    src = tmp_path / "mode.onnx"
    model = mode_model()
    if args[1] == "x=1":  # a dynamic batch dimension
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, src)
    assert_compile_refused(src, tmp_path, args, msg)


def test_budget_with_freeze_input_plans_the_taken_branch(tmp_path):
    """--budget measures the model file it is given: compile_model specializes the model first (freeze-inputs and
    cleanup, a float model) and plans that; the branch the frozen value takes gets quantized weights."""
    src, out = tmp_path / "mode.onnx", tmp_path / "q.onnx"
    onnx.save(mode_model(), src)
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, D)).astype(np.float32),
             mode=np.ones(16, np.int64))
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                                   "--freeze-input", "mode=1", "--budget", "60%"])
    assert res.exit_code == 0, res.output
    assert "specialized first (a float model, then planned under --budget): freeze-inputs{inputs=mode=1}" in res.output
    q = onnx.load(out)
    assert "If" not in [n.op_type for n in q.graph.node]
    weights = [numpy_helper.to_array(t) for t in q.graph.initializer if len(t.dims) == 2]
    assert weights and all(w.dtype != np.float32 for w in weights)
    feeds = [_feed(s) for s in range(8)]
    ref = np.concatenate([_run(src, f)[0] for f in feeds])
    assert sqnr(ref, np.concatenate([_run(out, f)[0] for f in feeds])) >= 20.0
    # with the measured default a budget is a constraint on its candidates, which freeze inside their own compiles:
    # nothing is specialized first
    auto = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "auto.onnx"), "--calib",
                                    str(tmp_path / "calib.npz"), "--freeze-input", "mode=1", "--plan", "auto",
                                    "--budget", "60%"])
    assert auto.exit_code == 0, auto.output
    assert "specialized first" not in auto.output and "freeze-inputs{inputs=mode=1}" in auto.output


def test_silero_if_model_frozen_at_16k_gets_its_convs_quantized(tmp_path):
    path = silero_if_model()
    calib_clip = realdata.silero_vad_inputs(1, "calib", frames=32)[0]["input"]
    eval_clip = realdata.silero_vad_inputs(1, "eval", frames=32)[0]["input"]  # 40 % of its frames speech
    calib, _ = _silero_stream(path, list(calib_clip))
    evals, ref = _silero_stream(path, list(eval_clip))
    np.savez(tmp_path / "calib.npz", **{k: np.stack([f[k] for f in calib]) for k in calib[0]})
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--plan", "default", "--calib",
                                   str(tmp_path / "calib.npz"), "--freeze-input", "sr=16000", "--report",
                                   str(tmp_path / "r.json"), "-q"])
    assert res.exit_code == 0, res.output
    q = onnx.load(out)
    top = [n.op_type for n in q.graph.node]
    assert top.count("Conv") == 6 and top.count("DequantizeLinear") >= 6  # the 16 kHz branch's Convs, int8
    assert [i.name for i in q.graph.input] == ["input", "state", "sr"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    got = []
    for feed in evals:  # streamed with its own state, as the float model was
        prob, state = sess.run(None, {**feed, "state": state})
        got.append(prob)
    r, g = np.concatenate(ref), np.concatenate(got)
    # measured: 15.0 dB and 31 of 32 decisions alike streamed (the quantized model's own state fed back: its
    # error accumulates in the float LSTM's state); on the recorded float states (the compile's validation) the
    # speech probability measures far higher
    assert sqnr(r, g) >= 12.0
    assert np.mean((r > 0.5) == (g > 0.5)) >= 0.93
    rep = json.loads((tmp_path / "r.json").read_text())["validation"]
    assert next(o for o in rep["outputs"] if o["name"] == "output")["sqnr_db"] >= 30.0
